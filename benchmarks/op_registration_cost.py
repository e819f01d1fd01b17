"""Host cost of the two ways to register an op pair with an autograd rule, on 1-element CPU tensors (so the
time is the wrappers' alone): `torch.library.custom_op` + `register_autograd`, against dispatcher ops defined
from schemas + a `torch.autograd.Function` (the way selective_scan/ops.py registers every op of the kernels).

    python benchmarks/op_registration_cost.py
"""
import time

import torch


@torch.library.custom_op("registration_cost_a::fwd", mutates_args=())
def _custom_fwd(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.clone(), w.clone()


@torch.library.custom_op("registration_cost_a::bwd", mutates_args=())
def _custom_bwd(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return dy.clone(), w.clone()


_custom_fwd.register_fake(lambda x, w: (torch.empty_like(x), torch.empty_like(w)))
_custom_bwd.register_fake(lambda dy, x, w: (torch.empty_like(x), torch.empty_like(w)))


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _custom_backward(ctx, dy, _):
    return _custom_bwd(dy, *ctx.saved_tensors)


_custom_fwd.register_autograd(_custom_backward, setup_context=_save_inputs)

_LIBRARY = torch.library.Library("registration_cost_b", "DEF")
_LIBRARY.define("fwd(Tensor x, Tensor w) -> (Tensor, Tensor)")
_LIBRARY.define("bwd(Tensor dy, Tensor x, Tensor w) -> (Tensor, Tensor)")
torch.library.impl("registration_cost_b::fwd", "CompositeExplicitAutograd")(lambda x, w: (x.clone(), w.clone()))
torch.library.impl("registration_cost_b::bwd", "CompositeExplicitAutograd")(lambda dy, x, w: (dy.clone(), w.clone()))


class _Pair(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        y, _ = torch.ops.registration_cost_b.fwd(x, w)
        ctx.save_for_backward(x, w)
        return y

    @staticmethod
    def backward(ctx, dy):
        return tuple(torch.ops.registration_cost_b.bwd(dy, *ctx.saved_tensors))


def per_call_us(fn, calls=2000, repeats=5):
    for _ in range(200):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def main():
    torch.set_num_threads(1)
    x, w = torch.randn(1, requires_grad=True), torch.randn(1, requires_grad=True)

    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn()
        return run

    rows = [
        ("custom_op, forward + backward", lambda: torch.ops.registration_cost_a.fwd(x, w)[0].backward()),
        ("dispatcher ops + autograd.Function, forward + backward", lambda: _Pair.apply(x, w).backward()),
        ("custom_op, forward without grad", no_grad(lambda: torch.ops.registration_cost_a.fwd(x, w))),
        ("dispatcher ops + autograd.Function, forward without grad", no_grad(lambda: _Pair.apply(x, w))),
    ]
    print(f"torch {torch.__version__}, 1 CPU thread, best of 5 x 2000 calls")
    print("| registration | host us per call |\n| --- | --- |")
    for name, fn in rows:
        print(f"| {name} | {per_call_us(fn):.1f} |")


if __name__ == "__main__":
    main()
