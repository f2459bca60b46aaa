"""The device mesh (data / fsdp / tensor / expert) and multi-host start-up.

Sizes come from `config.mesh`; one axis may be −1 ("whatever is left"). On a pod slice or a SLURM allocation
every process runs the same command: `initialize_distributed` joins them into one JAX runtime before any
device is touched, so `jax.devices()` lists every chip of the job and the mesh spans all hosts.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from doge_jax.parallel import sharding as sh
from doge_jax.trainer.validate import ConfigError

DISTRIBUTED_MODES = ("auto", "always", "never")


def mesh_shape(mesh_cfg, num_devices: int) -> dict[str, int]:
    """config.mesh → {axis: size} with the −1 axis filled; raises ConfigError (a ValueError) naming the field."""
    sizes = {axis: mesh_cfg[axis] for axis in sh.MESH_AXES}
    for axis, size in sizes.items():
        if not isinstance(size, int) or size == 0 or size < -1:
            raise ConfigError(f"config.mesh.{axis}={size!r} must be a positive size or -1 (fill the rest)")
    fill = [a for a, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ConfigError(f"config.mesh.{fill[1]}=-1: only one axis may be -1 (config.mesh.{fill[0]} is -1 too)")
    for axis, size in sizes.items():
        if size > 0 and num_devices % size:
            raise ConfigError(f"config.mesh.{axis}={size} does not divide {num_devices} devices")
    fixed = math.prod(s for s in sizes.values() if s > 0)
    if num_devices % fixed:
        raise ConfigError(f"config.mesh sizes {sizes} multiply to {fixed}, which does not divide {num_devices} devices")
    if fill:
        sizes[fill[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(f"config.mesh sizes {sizes} multiply to {fixed}, not the {num_devices} devices; "
                         "set one axis to -1 to fill")
    return sizes


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """The 4-axis mesh over `devices` (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(mesh_cfg, len(devices))
    shape = tuple(sizes[a] for a in sh.MESH_AXES)
    try:
        # Topology-aware order (ICI rings on TPU, NVLink islands on GPU).
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, sh.MESH_AXES)


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch is split: the product of the mesh axes the BATCH rule maps to."""
    spec = sh.logical_to_spec((sh.BATCH,))[0]
    axes = () if spec is None else ((spec,) if isinstance(spec, str) else spec)
    return math.prod(mesh.shape[a] for a in axes)


def _cluster_env() -> str | None:
    """Names the multi-process launcher this process runs under, if any (what `auto` initializes for)."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return "SLURM"
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "Open MPI"
    if importlib.util.find_spec("libtpu") is not None:
        # A Cloud TPU VM: jax.distributed.initialize() reads the slice's workers from the metadata server.
        # Skipped only when the environment says the slice has one host.
        hosts = os.environ.get("TPU_WORKER_HOSTNAMES")
        if hosts is None or "," in hosts:
            return "Cloud TPU"
    return None


def initialize_distributed(dist_cfg) -> None:
    """Joins the processes of a multi-host job (call before anything touches a device).

    config.distributed.coordinator_address (+ num_processes, process_id) initializes explicitly, e.g. on a
    GPU cluster without SLURM. Otherwise `initialize='auto'` initializes when a launcher is detected (Cloud
    TPU VM, SLURM with >1 task, Open MPI, JAX_COORDINATOR_ADDRESS), 'always' always does, 'never' never does.
    """
    mode = dist_cfg.initialize
    if mode not in DISTRIBUTED_MODES:
        raise ConfigError(f"config.distributed.initialize={mode!r} must be one of {list(DISTRIBUTED_MODES)}")
    if dist_cfg.coordinator_address:
        if dist_cfg.num_processes < 1 or not 0 <= dist_cfg.process_id < dist_cfg.num_processes:
            raise ConfigError(f"config.distributed.process_id={dist_cfg.process_id} must be in [0, "
                             f"config.distributed.num_processes={dist_cfg.num_processes}) with a coordinator_address")
        jax.distributed.initialize(coordinator_address=dist_cfg.coordinator_address,
                                   num_processes=dist_cfg.num_processes, process_id=dist_cfg.process_id)
        return
    if mode == "never":
        return
    env = _cluster_env()
    if mode == "always" or env is not None:
        logging.info("jax.distributed.initialize() (%s)", env or "config.distributed.initialize='always'")
        jax.distributed.initialize()
