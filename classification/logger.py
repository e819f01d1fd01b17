"""Swin-style logging: every rank writes ``log_rank{r}.txt``; only rank 0 also prints to the console."""
import logging
import os
import sys

from termcolor import colored

_FILE_FORMAT = "[%(asctime)s %(name)s] (%(filename)s %(lineno)d): %(levelname)s %(message)s"
_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


def create_logger(output_dir, dist_rank=0, name="vmamba"):
    """A logger writing to ``<output_dir>/log_rank{dist_rank}.txt`` (and stdout on rank 0).

    Calling it again (e.g. from a test running several trainings in one process) replaces the
    handlers instead of stacking them, so messages are not duplicated.
    """
    os.makedirs(output_dir, exist_ok=True)
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)

    if dist_rank == 0:
        console_format = (colored("[%(asctime)s %(name)s]", "green")
                          + colored("(%(filename)s %(lineno)d)", "yellow") + ": %(levelname)s %(message)s")
        console = logging.StreamHandler(sys.stdout)
        console.setLevel(logging.INFO)
        console.setFormatter(logging.Formatter(console_format, datefmt=_DATE_FORMAT))
        logger.addHandler(console)

    file_handler = logging.FileHandler(os.path.join(output_dir, f"log_rank{dist_rank}.txt"), mode="a")
    file_handler.setLevel(logging.INFO)
    file_handler.setFormatter(logging.Formatter(_FILE_FORMAT, datefmt=_DATE_FORMAT))
    logger.addHandler(file_handler)
    return logger
