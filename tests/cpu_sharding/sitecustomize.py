"""Lets the distributed tests run FSDP and DeepSpeed ZeRO-3 on CPU processes (gloo); imported by Python at start-up
when this folder is on PYTHONPATH (tests/test_distill_distributed.py puts it there for the trainer's workers).

accelerate 1.13 builds both engines only for GPU-type devices: on a CPU it silently drops an FSDP plugin
(AcceleratorState picks FSDP only for MULTI_GPU-like distributed types, the run becomes plain DDP) and gives a
DeepSpeed run no process-group backend (PartialState: one process of one). Inside a worker started by
`accelerate launch` (LOCAL_RANK set) and with MEDKD_TEST_CPU_SHARDING=1, this lifts exactly those two gates:
an FSDP plugin on MULTI_CPU makes the run FSDP, and DeepSpeed without a device backend gets gloo.

With DS_ACCELERATOR=cpu it also makes gloo's asynchronous collectives complete before they return. DeepSpeed
0.18.9's ZeRO-3 launches one all-gather per parameter and waits on the last handle only ("Wait ensures the
operation is enqueued", partition_parameters._allgather_params_coalesced): right on one ordered CUDA stream, but
gloo runs collectives on several threads and finishes them out of order, so a gathered weight was read (and the
checkpoint loader wrote into it) before its own all-gather landed: 4 runs in 10 started from garbage k/v
projection weights (NaN or 1e27). Everything else (the sharding, the hooks that gather weights, the trainer, our
loss) is the libraries' and ours, unchanged.
"""
import os

if os.environ.get("MEDKD_TEST_CPU_SHARDING") == "1" and "LOCAL_RANK" in os.environ:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    _accelerator_state_init = AcceleratorState.__init__
    _prepare_backend = PartialState._prepare_backend

    def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
        _accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            # Both shared states: every later AcceleratorState() copies PartialState's fields over its own.
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    def _backend_with_deepspeed_on_cpu(self, cpu=False, sagemaker_dp=False, backend=None):
        found, kind = _prepare_backend(self, cpu, sagemaker_dp, backend)
        if found is None and os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
            return "gloo", DistributedType.MULTI_CPU
        return found, kind

    AcceleratorState.__init__ = _init_with_fsdp_on_cpu
    PartialState._prepare_backend = _backend_with_deepspeed_on_cpu

if (os.environ.get("MEDKD_TEST_CPU_SHARDING") == "1" and "LOCAL_RANK" in os.environ
        and os.environ.get("DS_ACCELERATOR") == "cpu"):
    import functools

    import torch.distributed

    def _completed(collective):
        @functools.wraps(collective)
        def run(*args, **kwargs):
            work = collective(*args, **kwargs)
            if kwargs.get("async_op") and work is not None:
                work.wait()  # done before DeepSpeed touches the output, whichever handle it waits on
            return work
        return run

    for _name in ("all_gather_into_tensor", "all_gather", "reduce_scatter_tensor", "reduce_scatter", "all_reduce",
                  "broadcast", "all_to_all_single"):
        setattr(torch.distributed, _name, _completed(getattr(torch.distributed, _name)))
