import json
import subprocess
import sys

from kernrnn.cli import main


def test_cells_lists_shipped_cells(capsys):
    assert main(["cells"]) == 0
    out = capsys.readouterr().out
    for name in ("rnn", "lstm", "gru"):
        assert any(line.split()[0] == name for line in out.splitlines()[1:])
    assert "kernrnn_cells.lstm" in out and "ifgo" in out and "h,c" in out


def test_cells_json(capsys):
    assert main(["cells", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["gru"]["gates"] == "rzn" and rows["lstm"]["state"] == ["h", "c"]


def test_console_entry_point():
    out = subprocess.run([sys.executable, "-m", "kernrnn", "cells"], capture_output=True,
                         text=True, check=True).stdout
    assert "lstm" in out
