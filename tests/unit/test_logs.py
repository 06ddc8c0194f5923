"""The quiet console: the libraries' output (descriptor 2, and Ray's raylet notices, which Ray's
driver `print`s to sys.stdout) goes to <run>/logs/driver.log; the command's consoles keep theirs."""

import os
import sys

from rich.console import Console

from lossaverse.cluster.logs import library_logs


def test_library_output_goes_to_the_log_and_the_consoles_keep_the_terminal(tmp_path, capfd):
    out, err = Console(highlight=False), Console(stderr=True, highlight=False)
    with library_logs(tmp_path, consoles=(err,), outs=(out,)) as path:
        print("(raylet) WARNING: 8 PYTHON worker processes have been started")  # as ray's print_to_stdstream does
        os.write(2, b"INFO worker.py -- Started a local Ray instance\n")
        out.print("run generate ...")
        err.print("error: the product's own")
    seen = capfd.readouterr()
    log = path.read_text()
    assert path == tmp_path / "logs" / "driver.log"
    assert "PYTHON worker processes" in log and "Started a local Ray instance" in log
    assert "run generate" not in log and "product's own" not in log
    assert "run generate ..." in seen.out and "PYTHON worker" not in seen.out + seen.err
    assert "error: the product's own" in seen.err and "Started a local Ray" not in seen.err
    print("after")  # sys.stdout and the consoles are back where they were
    out.print("after, console")
    assert out.file is sys.stdout and "after\nafter, console" in capfd.readouterr().out


def test_verbose_leaves_everything_on_the_terminal(tmp_path, capfd):
    out = Console(highlight=False)
    with library_logs(tmp_path, verbose=True, outs=(out,)) as path:
        print("library line")
        out.print("product line")
    assert path is None and not (tmp_path / "logs").exists()
    assert "library line\nproduct line" in capfd.readouterr().out
