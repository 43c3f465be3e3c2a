"""`rankwatch gpu-check` on the CPU side: the no-GPU message, argument handling, the
`nvidia-smi -q -x` reader, and a whole run against the simulated NVML (under the real pynvml)
and a simulated nvidia-smi reading the same devices, where each check must pass on a healthy
node and fail when the device or nvidia-smi says something else."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pynvml
import pytest

from rankwatch.errors import InputError
from rankwatch.gpucheck import checks as C
from rankwatch.gpucheck.runner import Edges, NoGpu, detect, run_gpu_check
from rankwatch.gpucheck.smi import parse_smi_xml
from rankwatch.sim.nvml import ManualClock, SimulatedNVML
from rankwatch.sim.nvml_lib import installed_in_pynvml
from rankwatch.sim.smi import smi_xml

FIXTURE = Path(__file__).parent / "fixtures" / "nvidia-smi" / "h100-r550.xml"


def _has_gpu() -> bool:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


@pytest.mark.skipif(_has_gpu(), reason="this machine has an NVIDIA GPU")
def test_without_a_gpu_it_says_so_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    done = subprocess.run([sys.executable, "-m", "rankwatch", "gpu-check", "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "no NVIDIA GPU here" in done.stderr and "nothing was checked" in done.stderr
    assert "Traceback" not in done.stderr and not out.exists()
    # The standalone entry point (what `make gpu-check` runs in a GPU machine's own Python).
    done = subprocess.run([sys.executable, "-m", "rankwatch.gpucheck"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 2 and "no NVIDIA GPU here" in done.stderr, done.stderr


@pytest.mark.parametrize("args, message", [
    (["--load-seconds", "0"], "--load-seconds must be > 0"),
    (["--probe-steps", "0"], "--probe-steps ≥ 1"),
    (["--load-seconds", "soon"], "invalid float value"),
])
def test_bad_arguments_are_named(args: list[str], message: str) -> None:
    done = subprocess.run([sys.executable, "-m", "rankwatch", "gpu-check", *args],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_reads_an_r550_document() -> None:
    report = parse_smi_xml(FIXTURE.read_text())
    assert report.driver_version == "550.127.08"
    busy, idle = report.gpus
    assert (busy.pci_bus_id, busy.name) == ("00000000:53:00.0", "NVIDIA H100 80GB HBM3")
    assert busy.values == {
        "gpu_temp_c": 61, "memory_temp_c": 68, "power_w": 652.31, "sm_clock_mhz": 1980, "mem_clock_mhz": 2619,
        "fb_total_mib": 81559, "fb_used_mib": 72915, "fb_reserved_mib": 529, "gpu_util_pct": 100,
        "ecc_sbe_volatile": 0, "ecc_dbe_volatile": 0, "ecc_sbe_aggregate": 0, "ecc_dbe_aggregate": 0}
    # SRAM and DRAM counts add up; "[N/A]" is absent, not zero.
    assert (idle.values["ecc_sbe_volatile"], idle.values["ecc_dbe_volatile"]) == (14, 1)
    assert (idle.values["ecc_sbe_aggregate"], idle.values["ecc_dbe_aggregate"]) == (42, 2)
    assert "memory_temp_c" not in idle.values and idle.values["power_w"] == 71.52


def test_reads_the_power_element_of_older_drivers() -> None:
    r535 = ("<nvidia_smi_log><driver_version>535.104.05</driver_version><gpu id='00000000:53:00.0'>"
            "<gpu_power_readings><average_power_draw>70.10 W</average_power_draw>"
            "<instant_power_draw>71.90 W</instant_power_draw></gpu_power_readings></gpu></nvidia_smi_log>")
    r470 = ("<nvidia_smi_log><gpu id='00000000:53:00.0'><power_readings><power_draw>55.00 W</power_draw>"
            "</power_readings><ecc_errors><volatile><single_bit><total>3</total></single_bit>"
            "<double_bit><total>1</total></double_bit></volatile></ecc_errors></gpu></nvidia_smi_log>")
    assert parse_smi_xml(r535).gpus[0].values["power_w"] == 71.90
    old = parse_smi_xml(r470).gpus[0]
    assert (old.values["power_w"], old.values["ecc_sbe_volatile"], old.values["ecc_dbe_volatile"]) == (55, 3, 1)


@pytest.mark.parametrize("text, message", [("not xml", "not XML"), ("<html/>", "expected <nvidia_smi_log>")])
def test_a_document_that_is_not_nvidia_smis_is_named(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_smi_xml(text, source="nvidia-smi -q -x")


def test_disagreement_with_nvidia_smi_fails_within_tolerance_passes() -> None:
    smi = parse_smi_xml(FIXTURE.read_text()).gpus[0]
    ours = {"DCGM_FI_DEV_GPU_TEMP": 62, "DCGM_FI_DEV_POWER_USAGE": 640.0, "DCGM_FI_DEV_SM_CLOCK": 1980,
            "DCGM_FI_DEV_MEM_CLOCK": 2619, "DCGM_FI_DEV_FB_USED": 72915, "DCGM_FI_DEV_FB_FREE": 8115,
            "DCGM_FI_DEV_FB_RESERVED": 529, "DCGM_FI_DEV_MEMORY_TEMP": 68,
            "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL": 0, "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL": 0,
            "DCGM_FI_DEV_ECC_SBE_AGG_TOTAL": 0, "DCGM_FI_DEV_ECC_DBE_AGG_TOTAL": 0}
    assert {c.status for c in C.agrees_with_smi(0, ours, smi)} == {C.PASS}
    wrong = {**ours, "DCGM_FI_DEV_GPU_TEMP": 70, "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL": 1}
    failed = {c.name for c in C.agrees_with_smi(0, wrong, smi) if c.status == C.FAIL}
    assert failed == {"= nvidia-smi: DCGM_FI_DEV_GPU_TEMP", "= nvidia-smi: DCGM_FI_DEV_ECC_DBE_VOL_TOTAL"}


@contextlib.contextmanager
def simulated(sim: SimulatedNVML, clock: ManualClock, *, hot_smi: bool = False) -> Iterator[Edges]:
    """The edges of a simulated node: NVML under the real pynvml, nvidia-smi reading the same
    devices, a load that makes the GPUs busy, and time that moves only when the run waits."""
    @contextlib.contextmanager
    def load(gpus: list[int]) -> Iterator[None]:
        for g in gpus:
            sim.set_activity(g, 1.0)
        try:
            yield
        finally:
            sim.set_activity(None, 0.0)

    def smi() -> str:
        text = smi_xml(sim)
        if hot_smi:  # an nvidia-smi that reads other temperatures than NVML gives (33 °C → 933 °C)
            text = text.replace("<gpu_temp>", "<gpu_temp>9")
        return text

    sim.set_activity(None, 0.0)
    with installed_in_pynvml(sim) as nvml:
        yield Edges(nvml=nvml, smi_xml=smi, smi_query=lambda: None, load=load, probe_check=None,
                    sleep=clock.advance, clock=clock, why_no_probe="simulated node: no CUDA")


def test_a_healthy_simulated_node_passes_every_check() -> None:
    clock = ManualClock()
    sim = SimulatedNVML("sim-node", gpu_count=4, clock=clock)
    with simulated(sim, clock) as edges:
        report = run_gpu_check(edges, load_s=10)
    failed = [c for c in report.checks if c.status == C.FAIL]
    assert not failed, failed
    names = {c.name for c in report.checks if c.status == C.PASS}
    assert {"families", "= nvidia-smi: DCGM_FI_DEV_GPU_TEMP", "= nvidia-smi: framebuffer total",
            "GPM ratios in [0, 1]", "energy advances", "XID event registration",
            "load raises DCGM_FI_DEV_GPU_UTIL", "load raises DCGM_FI_PROF_PIPE_TENSOR_ACTIVE",
            "load raises DCGM_FI_DEV_POWER_USAGE", "nvml errors"} <= names
    per_gpu = {c.gpu for c in report.checks if c.name == "energy advances"}
    assert per_gpu == {0, 1, 2, 3}
    assert [c.status for c in report.checks if c.name == "probe: CUDA-event path"] == [C.SKIP]
    assert json.loads(json.dumps(report.as_dict()))["passed"] is True
    assert report.meta["driver"] == "550.127.08" and len(report.meta["gpus"]) == 4


def test_a_sick_node_or_a_disagreeing_nvidia_smi_fails() -> None:
    clock = ManualClock()
    sim = SimulatedNVML("sim-node", gpu_count=2, clock=clock, gpm_supported=False)
    sim.inject(1, "call_error", call="nvmlDeviceGetPowerUsage", error=pynvml.NVML_ERROR_UNKNOWN)
    with simulated(sim, clock, hot_smi=True) as edges:
        report = run_gpu_check(edges, load_s=10)
    failed = {(c.name, c.gpu) for c in report.checks if c.status == C.FAIL}
    assert ("= nvidia-smi: DCGM_FI_DEV_GPU_TEMP", 0) in failed  # nvidia-smi reads 9xx °C
    assert ("families", 1) in failed  # no power reading on GPU 1
    assert ("families", 0) not in failed  # GPM off is reported by the GPM check, not as missing
    assert ("nvml errors", None) in failed
    gpm = [c for c in report.checks if c.name == "GPM ratios in [0, 1]"]
    assert {c.status for c in gpm} == {C.SKIP} and all("unsupported" in c.detail for c in gpm)
    assert not report.passed


def test_detect_names_why_nvml_cannot_start() -> None:
    sim = SimulatedNVML("no-driver", init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    with installed_in_pynvml(sim) as nvml, pytest.raises(NoGpu, match="NVML cannot start .*Driver Not Loaded"):
        detect(nvml)
