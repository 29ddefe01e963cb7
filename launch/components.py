"""TorchX components for this project, registered as the ``dist`` group (see setup.cfg).

``dist.ddp`` is TorchX's own ``dist.ddp`` with one addition: when neither ``--script`` nor ``-m``
is given, a first positional argument ending in ``.py`` is taken as the script. So the command
users type, ``torchx run dist.ddp -j 2x8 launch/train.py``, works as typed; every other use of
``dist.ddp`` behaves as TorchX documents it, except that ``--max_retries N`` also
passes ``--max-restarts N`` to torchrun, so a killed worker restarts the job's workers in place
(they resume from the last checkpoint) even on schedulers without retries, such as local_cwd. (TorchX loads only the registered groups
once any are registered, so setup.cfg also re-registers TorchX's ``utils``, ``serve``,
``metrics`` and ``interpret`` builtins.)
"""


from typing import Dict, List, Optional

import torchx
import torchx.specs as specs
from torchx.components import dist as torchx_dist


def ddp(
    *script_args: str,
    script: Optional[str] = None,
    m: Optional[str] = None,
    image: str = torchx.IMAGE,
    name: str = "/",
    h: Optional[str] = None,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 1024,
    j: str = "1x2",
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
    rdzv_backend: str = "c10d",
    mounts: Optional[List[str]] = None,
    debug: bool = False,
    tee: int = 3,
) -> specs.AppDef:
    """
    Distributed data parallel application (torchrun), as TorchX's ``dist.ddp``; the script may
    also be given as the first positional argument (``dist.ddp -j 2x8 launch/train.py``).

    Args:
        script_args: the script (when it ends in .py and neither --script nor -m is given), then its arguments
        script: script or binary to run within the image
        m: the python module path to run
        image: image (e.g. docker)
        name: job name override: ``{experimentname}/{runname}``, ``{experimentname}/``, ``/{runname}`` or ``{runname}``
        cpu: number of cpus per replica
        gpu: number of gpus per replica
        memMB: cpu memory in MB per replica
        h: a registered named resource (if specified takes precedence over cpu, gpu, memMB)
        j: [{min_nnodes}:]{nnodes}x{nproc_per_node}, for gpu hosts, nproc_per_node must not exceed num gpus
        env: environment variables to be passed to the run (e.g. ENV1=v1,ENV2=v2,ENV3=v3)
        max_retries: the number of scheduler retries allowed; also torchrun's --max-restarts
        rdzv_port: the port on rank0's host for the c10d rendezvous store (multi-node only)
        rdzv_backend: the rendezvous backend to use (multi-node only)
        mounts: mounts to mount into the worker environment/container (ex. type=<bind/volume>,src=/host,dst=/job[,readonly])
        debug: whether to run with preset debug flags enabled
        tee: tees the specified std stream(s) to console + file. 0: none, 1: stdout, 2: stderr, 3: both
    """
    args = list(script_args)
    if script is None and m is None and args and args[0].endswith(".py"):
        script, args = args[0], args[1:]
    if max_retries > 0:
        # By default torchrun's workers share the rendezvous TCP store, whose keys outlive a
        # restart: a restarted worker can read its peer's address from the dead attempt and fail
        # with "connectFullMesh ... Connection refused". A store per rendezvous round avoids it.
        env = {**(env or {}), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    app = torchx_dist.ddp(
        *args, script=script, m=m, image=image, name=name, h=h, cpu=cpu, gpu=gpu, memMB=memMB, j=j,
        env=env, max_retries=max_retries, rdzv_port=rdzv_port, rdzv_backend=rdzv_backend,
        mounts=mounts, debug=debug, tee=tee,
    )
    if max_retries > 0:
        # Also let torchrun restart failed workers in place (all ranks of the job restart and
        # resume from the last checkpoint). Schedulers without retries (local_cwd) rely on this.
        role = app.roles[0]
        assert role.args[1].startswith("torchrun "), role.args
        role.args[1] = role.args[1].replace("torchrun ", f"torchrun --max-restarts {max_retries} ", 1)
    return app
