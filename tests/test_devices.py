"""A device that is not on this machine is refused up front, in one line naming it and what is available: by
`Solar.from_pretrained(device=)`, transformers' `device_map=`, and the CLI's `--device` (exit status 2)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import hf_fixtures as F
import pytest
import torch

from fastsolar import AutoModelForCausalLM, Solar
from fastsolar.devices import DeviceUnavailableError, available_devices, resolve_device

ROOT = Path(__file__).resolve().parent.parent
# A CUDA device this machine does not have: "cuda" itself without CUDA, else the index one past the last GPU.
MISSING = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return F.save(F.build_hf_model(num_hidden_layers=1, seed=5), tmp_path_factory.mktemp("devices") / "ckpt")


def test_resolves_what_is_here():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    expected = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device(None) == resolve_device("auto") == expected
    assert available_devices()[0] == "cpu" and len(available_devices()) == 1 + torch.cuda.device_count()


def test_a_missing_cuda_device_names_itself_and_what_is_available():
    with pytest.raises(DeviceUnavailableError) as e:
        resolve_device(MISSING)
    msg = str(e.value)
    assert f"'{MISSING}' is not available" in msg and msg.endswith(", ".join(available_devices()))
    assert "\n" not in msg


def test_without_cuda_the_reason_is_the_torch_build_or_no_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(DeviceUnavailableError, match=r"'cuda:0' is not available: .*; available here: cpu$"):
        resolve_device("cuda:0")
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(DeviceUnavailableError, match=r"'cuda' is not available: this torch .* is built without CUDA"):
        resolve_device("cuda")


def test_an_index_past_the_last_gpu_is_refused(one_gpu):
    assert resolve_device("cuda") == resolve_device(0) == torch.device("cuda", 0)
    with pytest.raises(DeviceUnavailableError, match=r"^device 'cuda:3' is not available: 1 CUDA device\(s\) visible; "
                                                     r"available here: cpu, cuda:0$"):
        resolve_device("cuda:3")
    with pytest.raises(DeviceUnavailableError, match="'cuda:1'"):
        resolve_device(1)


@pytest.mark.parametrize("bad, match", [("mps", r"fastsolar runs on cpu or cuda; available here: cpu"),
                                        ("meta", r"fastsolar runs on cpu or cuda"),
                                        ("gpu", r"device='gpu' is not a device"),
                                        (True, r"device=True is not a device")])
def test_other_devices_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        resolve_device(bad)


def test_from_pretrained_refuses_before_reading_the_checkpoint(tmp_path):
    # No checkpoint at all: the device is what is refused, so nothing was read first.
    with pytest.raises(DeviceUnavailableError, match=f"'{MISSING}' is not available"):
        Solar.from_pretrained(tmp_path / "nowhere", device=MISSING)


def test_device_map_is_refused_like_device(checkpoint):
    with pytest.raises(DeviceUnavailableError, match=f"'{MISSING}' is not available"):
        AutoModelForCausalLM.from_pretrained(checkpoint, device_map=MISSING)


def test_cli_refuses_a_missing_device_in_one_line_with_exit_2(checkpoint):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "fastsolar", "generate", str(checkpoint), "--prompt", "hi",
                           "--device", MISSING], capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fastsolar: error: device '{MISSING}' is not available"), lines
