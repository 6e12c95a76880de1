"""emajax.machine: the CPU a run is on, and the bf16 warning, from constructed /proc/cpuinfo texts."""

from emajax.machine import bf16_note, cpu_info

SAPPHIRE = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile
"""
ICE_LAKE = """processor\t: 0
cpu family\t: 6
model\t\t: 106
model name\t: Intel(R) Xeon(R) Processor @ 2.80GHz
flags\t\t: fpu sse avx2 avx512f avx512_vnni
processor\t: 1
cpu family\t: 6
model\t\t: 106
model name\t: Intel(R) Xeon(R) Processor @ 2.80GHz
flags\t\t: fpu sse avx2 avx512f avx512_vnni
"""
ZEN4 = "cpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC 9B14\nflags\t\t: avx2 avx512f avx512_bf16\n"


def test_cpu_info_reads_model_and_bf16_flags():
    a = cpu_info(SAPPHIRE)
    assert (a["cpu"], a["cpu_family_model"]) == ("Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", "6/143")
    assert a["avx512_bf16"] and a["amx_bf16"] and a["native_bf16"] and a["avx512f"]
    b = cpu_info(ICE_LAKE)  # the first processor's fields; "model name" is not taken for "model"
    assert b["cpu_family_model"] == "6/106" and b["avx512f"]
    assert (b["avx512_bf16"], b["amx_bf16"], b["native_bf16"]) == (False, False, False)
    c = cpu_info(ZEN4)
    assert c["native_bf16"] and not c["amx_bf16"] and c["cpu_family_model"] == "25/17"


def test_unknown_flags_stay_unknown_and_warn_nothing():
    d = cpu_info("")  # no /proc/cpuinfo (macOS, Windows)
    assert d["native_bf16"] is None and d["cpu_family_model"] is None and d["cpu"]
    assert bf16_note(d) is None and bf16_note(cpu_info(SAPPHIRE)) is None
    note = bf16_note(cpu_info(ICE_LAKE))
    assert "family/model 6/106" in note and "AMX-BF16" in note and "docs/demo.md" in note
