"""Ad-hoc hardware specs and fuzzy catalog names: what they resolve to, and one-line errors naming the field."""

import pytest

from strata.analysis.hardware import load_catalog, parse_system, resolve_device
from strata.analysis.hwspec import parse_spec
from strata.errors import ConfigError


def test_spec_fields_and_units():
    dev, notes = parse_spec("mem_bw=800GB/s,bf16=100TFLOPS,mem=64GB,cores=16")
    assert (dev.bandwidth_gbs, dev.peak("fp16"), dev.memory_gb, dev.cls) == (800, 100e12, 64, "gpu")
    assert not notes
    dev, _ = parse_spec("mem_bw=3.35TB/s, fp8=1.979PFLOPS, mem=80GiB, link=50GB/s, name=my-h100")
    assert dev.bandwidth_gbs == pytest.approx(3350) and dev.peak("fp8") == pytest.approx(1979e12)
    assert dev.memory_gb == pytest.approx(80 * 1.073741824) and dev.link_gbs == 50 and dev.name == "my-h100"


def test_cpu_spec_from_cores_says_what_it_assumed():
    dev, notes = parse_spec("mem_bw=89.6,cores=8")
    assert dev.cls == "cpu-x86" and dev.peak("fp32") == pytest.approx(8 * 3.0 * 32 * 1e9)
    assert any("assumed from 8 cores" in n for n in notes) and any("memory 16 GB assumed" in n for n in notes)


@pytest.mark.parametrize("spec,field", [
    ("mem_bw=fast,bf16=100TFLOPS", "mem_bw"), ("mem_bw=800GB/s,bf16=lots", "bf16"),
    ("mem_bw=800GB/s,bf16=100TFLOPS,mem=-1GB", "mem"), ("mem_bw=800GB/s,bf16=100,cores=many", "cores"),
    ("mem_bw=800GB/s,bf16=100,class=quantum", "class"), ("mem_bw=800GB/s,bf16=100,colour=red", "colour"),
    ("bf16=100TFLOPS", "mem_bw"), ("mem_bw=800GB/s", "bf16"),
])
def test_bad_specs_are_one_line_errors_naming_the_field(spec, field):
    with pytest.raises(ConfigError) as e:
        parse_system(spec)
    msg = str(e.value)
    assert f"'{field}'" in msg and "\n" not in msg


@pytest.mark.parametrize("text,key", [
    ("Apple M1 Ultra (64-core GPU)", "apple-m1-ultra"), ("Apple M1 Ultra 48-core GPU", "apple-m1-ultra-48c"),
    ("Apple M3 Max (30-core GPU)", "apple-m3-max-30c"), ("Apple M1 Max", "apple-m1-max"), ("Apple M3", "apple-m3"),
    ("NVIDIA GeForce RTX 3070 8GB", "rtx3070"), ("NVIDIA RTX 6000 Ada Generation", "rtx-6000-ada"),
    ("NVIDIA DGX Spark", "dgx-spark"), ("NVIDIA L40S", "l40s"), ("NVIDIA L4", "l4"), ("NVIDIA A40", "a40"),
    ("AMD Radeon RX 7900 XTX", "rx7900xtx"), ("AMD Instinct MI300X", "mi300x"), ("GH200", "gh200"),
    ("Raspberry Pi 5 8GB", "raspberry-pi-5"), ("Jetson AGX Orin 64GB", "jetson-agx-orin"),
    ("Intel Core i9-14900K", "i9-14900k"), ("AMD EPYC 9654", "epyc-9654"), ("Snapdragon 8 Gen 3", "snapdragon-8-gen-3"),
])
def test_catalog_names_resolve(text, key):
    assert resolve_device(text)[0] == key


def test_fuzzy_match_says_what_it_took_and_gives_up_when_far():
    key, how = resolve_device("Nvidia Geforce RTX4090")
    assert key == "rtx4090"
    key, how = resolve_device("Jetson Orni Nano")  # a typo: no alias occurs in it
    assert key == "jetson-orin-nano" and "closest name" in how
    assert resolve_device("Quantum Annealer 3000")[0] is None
    sys = parse_system("NVIDIA RTX 6000 Ada")
    assert sys.device.key == "rtx-6000-ada" and "rtx-6000-ada" in sys.notes[0]


def test_catalog_covers_the_machines_people_run_on():
    cat = load_catalog()
    for k in ("apple-m1", "apple-m1-ultra", "apple-m2-pro", "apple-m3-ultra", "apple-m4-max-32c", "rtx2080ti", "rtx3070",
              "rtx4060ti", "rtx5080", "rtx-a4000", "rtx-6000-ada", "a40", "l4", "l40s", "a100-80gb", "h200", "b200",
              "gh200", "dgx-spark", "mi250", "mi300x", "rx7900xtx", "xeon-8480", "epyc-9754" if "epyc-9754" in cat
              else "epyc-9755", "raspberry-pi-5", "jetson-orin-nano", "snapdragon-8-elite", "apple-a18-pro"):
        assert k in cat and cat[k].source, k
    # memory bandwidth as the vendor states it
    assert cat["apple-m1-ultra"].bandwidth_gbs == 800 and cat["apple-m4-max-32c"].bandwidth_gbs == 410
    assert cat["rtx3070"].bandwidth_gbs == 448 and cat["rtx-6000-ada"].bandwidth_gbs == 960
