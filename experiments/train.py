"""Trains and evaluates one config; rerunning the same command resumes from the latest checkpoint.

  python experiments/train.py --config=configs/decoder_lm.py --workdir=/tmp/tx/lm \
      --config.model.attention=gqa --config.train.steps=500

On 8 devices (data parallel 2, FSDP 2, tensor parallel 2):

  python experiments/train.py --config=configs/gpt2_small.py --workdir=/tmp/tx/gpt2 \
      --config.mesh.data=2 --config.mesh.fsdp=2 --config.mesh.tensor=2

On several hosts run the same command on every host with ``--multihost`` (SLURM, Open MPI,
Kubernetes and Cloud TPU are detected; elsewhere add ``--coordinator_address=host0:1234
--num_processes=N --process_id=i``); the mesh spans the devices of all hosts, the workdir must
be a shared directory, and only process 0 writes logs and prints.
"""

from absl import flags
from ml_collections import config_flags

from tx.experiments import _cli
from tx import parallel
from tx.train import loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "A config file (configs/*.py), or a "
                                          "built-in one: tx:NAME[:ARG], e.g. tx:decoder_lm.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output and checkpoint directory.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", None, "Join a multi-host run (jax.distributed.initialize). Default: on when "
    "a launcher set JAX_COORDINATOR_ADDRESS, SLURM_NTASKS>1 or OMPI_COMM_WORLD_SIZE>1.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (multi-host, outside a cluster).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (0 writes logs).")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, _cli.PRINT_CONFIG_HELP)


def main(argv):
    _cli.start(argv)
    config = _cli.required(_CONFIG, "give --config=<a configs/*.py file or tx:NAME>.")
    if _PRINT_CONFIG.value:
        return _cli.print_config(config)
    workdir = _cli.required(_WORKDIR, "give --workdir=<the run's output directory>.")
    multihost = _MULTIHOST.value
    if multihost is None:
        multihost = parallel.launched_on_many_hosts() or _COORDINATOR.value is not None
    if multihost:
        parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                        _PROCESS_ID.value)
    with _cli.one_line_errors():
        summary = loop.run(config, workdir)
    if loop.is_main_process():
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in summary.items()))


def cli() -> None:
    """The console entry point (``tx-train``)."""
    _cli.run(main)


if __name__ == "__main__":
    cli()
