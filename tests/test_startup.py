"""``kernrnn bench --startup``: the phase and compile records, and their table (no timings checked)."""

from __future__ import annotations

from kernrnn.bench import startup


def test_child_records_every_phase_and_the_compilations_it_saw():
    r = startup._child("rnn", 2, 3, 4, 5, "train,infer")
    assert set(r["phases"]) == set(startup.PHASES)
    assert all(v >= 0 for v in r["phases"].values())
    for c in r["compiles"]:
        assert c["phase"] in startup.PHASES and 0 <= c["self_s"] <= c["total_s"] + 1e-9


def test_table_lists_each_run_and_the_compiled_functions():
    def run(compiles, loaded):
        return {"phases": {p: 0.5 for p in startup.PHASES}, "total_s": 2.5, "wall_s": 3.0,
                "compiles": compiles, "loaded": loaded}

    tile = dict(name="tile_4x64", module="kernrnn_gen_cpu_tile_4x64_float32_ab", phase=
                "train forward", total_s=2.0, self_s=2.0, depth=1)
    record = {"cell": "lstm", "size": [32, 100, 64, 128], "threads": 1, "order": "train,infer",
              "cold": run([tile], []), "edited": run([], ["tile_4x64 (m)"]), "warm": run([], [])}
    text = startup.format_breakdown(record)
    assert "cold s" in text and "edited s" in text and "warm s" in text
    assert "tile_4x64" in text and "1 functions compiled (2.00 s)" in text
    assert "1 kernels loaded from the kernel cache" in text
