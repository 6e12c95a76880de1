"""Meshes that respect the hardware and clear start-up errors: device order from jax.make_mesh, unused
devices refused unless allowed, hybrid (DCN) sizes checked, incomplete coordinator variables named."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from emajax.models.sharding import make_mesh  # noqa: E402
from emajax.train.mesh import DistributedConfigError, build_mesh, coordinator_env  # noqa: E402
from emajax.train.config import MeshCfg  # noqa: E402


@pytest.mark.devices(8)
def test_mesh_uses_every_device_or_says_why_not():
    assert len(jax.devices()) == 8  # exactly the suite's 8: the messages name the count
    m = make_mesh(2, -1, 2)
    assert dict(m.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert sorted(d.id for d in m.devices.flat) == sorted(d.id for d in jax.devices())
    with pytest.raises(ValueError, match=r"uses 2 of the 8 devices.*mesh.allow_unused"):
        make_mesh(1, 2, 1)
    assert make_mesh(1, 2, 1, allow_unused=True).devices.size == 2
    assert build_mesh(MeshCfg(fsdp=-1)).shape["fsdp"] == 8
    with pytest.raises(ValueError, match="uses 1 of the 8"):
        build_mesh(MeshCfg())


def test_a_mesh_that_leaves_a_process_without_devices_is_an_error():
    class Dev:  # what make_mesh reads of a device before building the mesh
        def __init__(self, i: int, process: int):
            self.id, self.process_index = i, process

    two_hosts = [Dev(i, i // 4) for i in range(8)]
    with pytest.raises(ValueError, match=r"uses 2 of the 8 devices and none of process\(es\) 1: in a multi-process"):
        make_mesh(1, 2, 1, devices=two_hosts, allow_unused=True)
    with pytest.raises(ValueError, match="needs 16 devices"):
        make_mesh(4, 2, 2)
    with pytest.raises(ValueError, match="at most one may be -1"):
        make_mesh(-1, -1, 1)


@pytest.mark.devices(8)
def test_device_order_is_jax_make_mesh_order():
    want = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3).devices
    assert [d.id for d in make_mesh(2, 2, 2).devices.flat] == [d.id for d in want.flat]


def test_batch_rows_is_the_product_of_the_batch_axes():
    from emajax.losses.rows import batch_rows

    assert batch_rows(jax.sharding.AbstractMesh((2, 3, 5), ("data", "fsdp", "tensor"))) == 6
    assert batch_rows(None) == 1


def test_hybrid_mesh_needs_as_many_slices_as_asked():
    # One process and no TPU slices here: a 2-slice (DCN) mesh cannot be built, and the sizes are checked
    # before JAX is asked (the 2-process run in test_distributed.py builds a real one).
    with pytest.raises(ValueError):
        make_mesh(1, 4, 1, dcn_fsdp=2)
    with pytest.raises(ValueError, match="dcn"):
        make_mesh(1, 4, 1, dcn_fsdp=0)


@pytest.mark.parametrize("env,missing", [
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234"}, "JAX_NUM_PROCESSES, JAX_PROCESS_ID"),
    ({"JAX_NUM_PROCESSES": "2"}, "JAX_COORDINATOR_ADDRESS, JAX_PROCESS_ID"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "2"}, "JAX_PROCESS_ID"),
])
def test_incomplete_coordinator_variables_are_named(env, missing):
    with pytest.raises(DistributedConfigError, match=f"but {missing} not"):
        coordinator_env(env)


def test_coordinator_variables_are_checked():
    ok = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert coordinator_env(ok) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
    assert coordinator_env({}) is None
    with pytest.raises(DistributedConfigError, match="0..JAX_NUM_PROCESSES-1"):
        coordinator_env({**ok, "JAX_PROCESS_ID": "4"})
    with pytest.raises(DistributedConfigError, match="HOST:PORT"):
        coordinator_env({**ok, "JAX_COORDINATOR_ADDRESS": "10.0.0.1"})
    with pytest.raises(DistributedConfigError, match="integers"):
        coordinator_env({**ok, "JAX_NUM_PROCESSES": "four"})


def test_cli_reports_incomplete_coordinator_variables(tmp_path, monkeypatch, capsys):
    """Before: a bare KeyError traceback from jax.distributed set-up."""
    from _train_tiny import write_chats

    from emajax.cli import main

    write_chats(tmp_path / "train.jsonl", 4)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {name: nowhere}\ndata: {train: [train.jsonl]}\n")
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
    monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
    assert main(["train", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "JAX_NUM_PROCESSES, JAX_PROCESS_ID not" in err and "Traceback" not in err
