"""The implicit attention of a selective scan (analyze/attnmap.py) against the scan itself."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from analyze import attnmap
from analyze.attnmap import ScanInputs, raster_attention, route_attention, route_orders
from classification.models import SS2D
from selective_scan import selective_scan_ref


def _random_scan(channels, states, length, generator, dt_scale=0.5):
    """Inputs in the style of mamba's selective-scan reference test, in float64."""
    def rand(*shape):
        return torch.rand(*shape, generator=generator, dtype=torch.float64)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)
    return dict(u=randn(channels, length), delta=dt_scale * rand(channels, length), A=-0.5 * rand(channels, states),
                B=randn(states, length), C=randn(states, length), bias=0.5 * rand(channels))


def _scan_output(scan):
    """y of the reference selective scan (one batch element, one B/C group, no D skip)."""
    y = selective_scan_ref(scan["u"][None], scan["delta"][None], scan["A"], scan["B"][None, None],
                           scan["C"][None, None], delta_bias=scan["bias"], delta_softplus=True)
    return y[0]


def _attention_output(scan):
    dt = F.softplus(scan["delta"] + scan["bias"][:, None])
    matrices = route_attention(dt, scan["A"], scan["B"], scan["C"], reduce_channels=False)  # (D, L, L)
    return torch.einsum("dij,dj->di", matrices, scan["u"]), matrices


def test_attention_matrix_reproduces_the_scan():
    scan = _random_scan(channels=3, states=2, length=17, generator=torch.Generator().manual_seed(0))
    y_attention, matrices = _attention_output(scan)
    torch.testing.assert_close(y_attention, _scan_output(scan), rtol=1e-9, atol=1e-9)
    upper = torch.triu(torch.ones(17, 17, dtype=torch.bool), diagonal=1)
    assert (matrices[:, upper] == 0).all() and (matrices[:, ~upper] != 0).any()


def test_attention_stays_finite_where_the_cumulative_decay_underflows():
    # cum reaches about -1300: exp(cum) underflows to 0 in float64, so w_i / w_j would be 0/0.
    scan = _random_scan(channels=2, states=1, length=600, generator=torch.Generator().manual_seed(1), dt_scale=10.0)
    y_attention, matrices = _attention_output(scan)
    assert torch.isfinite(matrices).all()
    torch.testing.assert_close(y_attention, _scan_output(scan), rtol=1e-7, atol=1e-7)


def test_channel_average_and_query_rows_agree_with_the_full_matrices():
    scan = _random_scan(channels=4, states=3, length=9, generator=torch.Generator().manual_seed(2))
    dt = F.softplus(scan["delta"] + scan["bias"][:, None])
    per_channel = route_attention(dt, scan["A"], scan["B"], scan["C"], reduce_channels=False)
    averaged = route_attention(dt, scan["A"], scan["B"], scan["C"])
    torch.testing.assert_close(averaged, per_channel.mean(0))
    rows = route_attention(dt, scan["A"], scan["B"], scan["C"], rows=torch.tensor([4, 7]))
    torch.testing.assert_close(rows, averaged[[4, 7]])


def _random_inputs(height, width, channels=3, states=2, seed=3):
    generator = torch.Generator().manual_seed(seed)
    routes, length = 4, height * width
    return ScanInputs(
        dts=torch.randn(routes * channels, length, generator=generator, dtype=torch.float64),
        A=-torch.rand(routes * channels, states, generator=generator, dtype=torch.float64),
        Bs=torch.randn(routes, states, length, generator=generator, dtype=torch.float64),
        Cs=torch.randn(routes, states, length, generator=generator, dtype=torch.float64),
        delta_bias=torch.rand(routes * channels, generator=generator, dtype=torch.float64),
        delta_softplus=True, height=height, width=width)


def test_route_orders_follow_the_cross2d_routes():
    orders = route_orders(2, 3)
    assert orders.tolist() == [[0, 1, 2, 3, 4, 5], [0, 3, 1, 4, 2, 5], [5, 4, 3, 2, 1, 0], [5, 2, 4, 1, 3, 0]]


def test_every_route_is_causal_in_its_own_order():
    height, width = 4, 5
    matrices = raster_attention(_random_inputs(height, width))  # (K, L, L) in raster order
    positions = torch.argsort(route_orders(height, width), dim=1)
    for k in range(4):
        # pixel s comes after pixel r on route k  ->  s cannot influence r through route k
        later = positions[k][None, :] > positions[k][:, None]
        assert (matrices[k][later] == 0).all(), f"route {k} is not causal"
        assert (matrices[k][~later] != 0).all(), f"route {k} lost weights it should have"
    # Concretely: pixel (0, 1) precedes (1, 0) row-major but follows it column-major.
    row_0_col_1, row_1_col_0 = 1, width
    assert matrices[0][row_1_col_0, row_0_col_1] != 0 and matrices[1][row_1_col_0, row_0_col_1] == 0
    assert torch.equal(matrices[0], torch.tril(matrices[0])) and torch.equal(matrices[2], torch.triu(matrices[2]))


def test_query_rows_are_rows_of_the_raster_matrices():
    inputs = _random_inputs(3, 4)
    matrices = raster_attention(inputs)
    for query in (0, 5, 11):
        torch.testing.assert_close(raster_attention(inputs, query=query), matrices[:, query])


# ----------------------------------------------------------------------------- with the real SS2D
SCAN_ARGUMENTS = ("u", "delta", "A", "B", "C", "D", "delta_bias", "delta_softplus")


@pytest.mark.parametrize("channel_first", [True, False])
def test_attention_of_an_ss2d_layer_reproduces_its_scan(channel_first):
    torch.manual_seed(0)
    layer = SS2D(d_model=8, d_state=2, ssm_ratio=1.0, forward_type="v05_noz", channel_first=channel_first).eval()
    x = torch.randn(1, 8, 3, 4) if channel_first else torch.randn(1, 3, 4, 8)
    with torch.no_grad():
        scan = layer.scan_inputs(x)
    assert (scan["height"], scan["width"], scan["routes"]) == (3, 4, "cross2d")
    y = selective_scan_ref(**{name: scan[name] for name in SCAN_ARGUMENTS})[0]       # (K*D, L)
    inputs = ScanInputs(dts=scan["delta"][0], A=scan["A"], Bs=scan["B"][0], Cs=scan["C"][0],
                        delta_bias=scan["delta_bias"], delta_softplus=True, height=3, width=4)
    dt, A, u = inputs.deltas(), inputs.A.view(4, 8, -1), scan["u"][0].view(4, 8, -1)
    for k in range(4):
        matrices = route_attention(dt[k], A[k], inputs.Bs[k], inputs.Cs[k], reduce_channels=False)
        y_k = torch.einsum("dij,dj->di", matrices, u[k]) + scan["D"].view(4, 8)[k, :, None] * u[k]
        torch.testing.assert_close(y_k, y.view(4, 8, -1)[k].float(), rtol=1e-4, atol=1e-5)


def test_attnmap_command_on_vmamba(tmp_path):
    attnmap.main(["--model", "vmamba_tiny_s1l8", "--random-image", "--img-size", "64", "--query", "40", "20",
                  "--device", "cpu", "--out", str(tmp_path)])
    for picture in ("attnmap.png", "attnmatrix.png"):
        assert (tmp_path / picture).stat().st_size > 1000
    saved = np.load(tmp_path / "attnmap.npz")
    matrices, rows = torch.from_numpy(saved["matrices"]), torch.from_numpy(saved["query_rows"])
    # the default layer is in stage 2: stride 16, so a 4 x 4 map; pixel (40, 20) is in cell (2, 1)
    assert rows.shape == (4, 4, 4) and int(saved["query_index"]) == 2 * 4 + 1
    torch.testing.assert_close(rows.view(4, 16), matrices[:, 9])
    positions = torch.argsort(torch.from_numpy(saved["route_orders"]), dim=1)
    for k in range(4):
        later = positions[k][None, :] > positions[k][:, None]
        assert (matrices[k][later] == 0).all() and (matrices[k].diagonal() != 0).all()
