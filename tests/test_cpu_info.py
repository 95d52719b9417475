"""ryzen_opt.cpu_info: the vector ISA named from CPU flags, and this machine's description."""

import pytest

from ryzen_opt import cpu_info

# The flags line of the AVX2-only EPYC VM the committed CPU results were measured on (cut).
ZEN3_VM = "fpu vme sse sse2 ssse3 fma cx16 sse4_1 sse4_2 movbe popcnt aes xsave avx f16c avx2"
# A host exposing AVX-512 with bf16 and VNNI (Sapphire Rapids class, cut).
AVX512_HOST = (
    "sse2 sse4_2 avx fma avx2 avx512f avx512dq avx512cd avx512bw avx512vl avx_vnni "
    "avx512_bf16 avx512_vnni"
)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (ZEN3_VM, "AVX2+FMA"),
        (AVX512_HOST, "AVX512 (avx512f, avx512bw, avx512vl, avx512_bf16, avx512_vnni)"),
        ("avx512f avx2 fma", "AVX512 (avx512f)"),
        ("sse4_2 avx avx2", "AVX2"),
        ("sse4_2 avx", "AVX"),
        ("sse2 sse4_2", "SSE4.2"),
        ("fp asimd evtstrm sve", "SVE"),
        ("fp asimd evtstrm", "NEON"),
        ("", "unknown"),
    ],
)
def test_isa_from_flags_names_the_widest_vector_isa(flags, expected):
    assert cpu_info.isa_from_flags(flags) == expected
    assert cpu_info.isa_from_flags(flags.split()) == expected


def test_isa_from_flags_rejects_a_non_string_argument():
    with pytest.raises(TypeError, match="flags"):
        cpu_info.isa_from_flags(3)
    with pytest.raises(TypeError, match="flags"):
        cpu_info.isa_from_flags(["avx2", 3])


def test_cpu_flags_reads_the_x86_and_arm_lines_of_a_cpuinfo_file(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text(f"processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: {ZEN3_VM}\n\n")
    assert cpu_info.cpu_flags(x86) == set(ZEN3_VM.split())
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve\n")
    assert cpu_info.isa_from_flags(cpu_info.cpu_flags(arm)) == "SVE"
    assert cpu_info.cpu_flags(tmp_path / "missing") is None


def test_cpu_isa_uses_the_flags_and_appends_torchs_dispatch_level(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text(f"flags\t: {ZEN3_VM}\n")
    torch_cap = cpu_info.torch_cpu_capability()
    assert cpu_info.cpu_isa(f) == f"AVX2+FMA; torch: {torch_cap}"
    # No cpuinfo (macOS, Windows): torch's capability is still reported.
    assert torch_cap in cpu_info.cpu_isa(tmp_path / "missing")


def test_this_machine_has_a_non_empty_isa_description():
    desc = cpu_info.cpu_isa()
    assert isinstance(desc, str) and desc.strip() and "torch:" in desc


def test_optimization_report_records_and_prints_the_cpu_isa():
    from ryzen_opt.optimization.report import OptimizationReport

    r = OptimizationReport(model="M", device="cpu", dtype="float32")
    assert r.environment["cpu_isa"] == cpu_info.cpu_isa()
    assert f"CPU ISA {r.environment['cpu_isa']}" in r.to_markdown()
    assert r.to_dict()["environment"]["cpu_isa"] == r.environment["cpu_isa"]
    # A report built with a recorded ISA (another machine's) keeps it.
    other = OptimizationReport("M", "cpu", "float32", environment={"cpu_isa": "AVX2+FMA"})
    assert "CPU ISA AVX2+FMA" in other.to_markdown()


def test_benchmark_environment_and_title_carry_the_cpu_isa():
    from bench.common import environment, where

    env = environment("cpu")
    assert env["cpu_isa"] == cpu_info.cpu_isa()
    assert env["cpu_isa"] in where(env)
