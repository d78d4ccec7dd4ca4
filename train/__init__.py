"""Train GPT-2 (``models.gpt2``) with pallas_flash attention: ``python -m train``.

With no arguments it picks a run that fits the machine:

* no GPU: the ``tiny`` model (2 layers, width 128) on 128-byte windows of the
  Python standard library's sources, 600 steps of 16 sequences, with XLA
  attention (the Pallas kernels would run in the slow interpret mode), float32
  compute (bf16 matmuls are emulated, twice as slow, on a CPU). One to two
  minutes on two CPU cores (validation loss ~1.97 nats/byte).
* a GPU: the ``gpt2`` 124M body (byte vocabulary) at T=1024, batch 16,
  2000 steps, Pallas attention, bf16 compute.

``--help`` lists the overrides. Everything lands in ``--out`` (default
``out/<config>``): ``metrics.jsonl`` (one JSON object per logged step:
``step, loss, lr, tokens_per_s, mfu, grad_norm``; one per evaluation: ``step,
val_loss``), ``config.json`` and Orbax checkpoints in ``checkpoints/`` (every
``--checkpoint-every`` steps and at the end). ``--resume`` continues the run in
``--out`` from its latest checkpoint: same step, optimizer state, data
position and RNG, so a killed run loses at most the steps since its last
checkpoint; ``--steps`` may be raised to train longer. At the end it prints a
short sample from the model.

A run never loses or corrupts another: it holds a lock on ``--out``
(``.lock``) while it runs, and a second run there stops at once. Everything it
is told is checked before it writes anything (finite numbers, a GPU for
``--attention cudnn``, token ids below ``--vocab-size``, a sequence's worth of
data, a readable ``metrics.jsonl``, steps left to train on ``--resume``); a
mistake is one line ``error: ...`` naming the flag or file, exit code 2.
``--resume`` takes the newest checkpoint that reads back, warns about newer
damaged ones and moves them to ``checkpoints.corrupt/``. A loss or gradient
that turns NaN or infinite stops the run with exit code 1, naming the step; no
checkpoint of a non-finite state is ever saved, so the last one stays good.
Ctrl-C (exit code 130) and SIGTERM (143; SLURM, Kubernetes, ``docker stop``)
stop it once the checkpoint being written is on disk; during training the
first one also waits for the step in flight and saves the last finished step
(one process; a second Ctrl-C stops at once). The checkpoints folder
is probed for writing before training. Every checkpoint records its data (kind,
split lengths, a hash of the tokens): ``--resume`` on other data, or where
``--dtype auto`` means another dtype, is refused; so is an ``--out`` inside a
byte ``--data`` folder (the run would train on its own checkpoints).

Batch sizes are global: ``--batch-size`` sequences per micro-step over all
devices, ``--grad-accum`` micro-steps per optimizer step (accumulated inside
the one jitted step), so an optimizer step sees
``batch_size * grad_accum * seq_len`` tokens.

Several devices (:mod:`train.parallel`): every run has a mesh ``("data",
"seq")`` of shape ``(devices // N, N)``, ``N = --context-parallel`` (default
1). The batch is sharded over ``data``: data parallelism, where each device's
attention kernels run on its own rows (nothing is gathered) and XLA
all-reduces the gradients; ``--batch-size`` must divide by ``devices // N``.
With ``--context-parallel N`` each sequence is sharded over the ``N`` devices
of ``seq`` too: every attention layer runs ring attention (keys and values go
around the ring), on the Pallas kernels (``--attention auto`` or ``pallas``),
in the zigzag layout that balances causal work; ``--seq-len`` must divide by
``2 N``. The host puts the tokens of each batch (inputs and targets alike) in
zigzag order and the model embeds the permuted positions, so the loss is the
same as without it. Parameters and optimizer state are replicated.
Checkpoints hold replicated arrays, so a run resumes on another mesh
(``--resume --context-parallel M``). To test on a CPU::

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m train --context-parallel 2 ...

Several hosts: start the same command on every host with the coordinator
given through the environment, e.g.::

    JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=<i> \\
        python -m train --multihost ...

``--multihost`` calls ``jax.distributed.initialize()`` first, with
``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` when they are set (under SLURM,
Open MPI and the other clusters JAX knows it finds them by itself). The mesh
then spans every process's devices in process order; each process loads only
the rows of every global batch its devices hold (the batches are a function
of (seed, step), so hosts agree without talking) and hands them to
``jax.make_array_from_process_local_data``. Keep ``N`` within one host (it
divides the GPUs per host) so the ring runs over NVLink. ``--out`` must be a
folder every host can write (Orbax writes one checkpoint cooperatively). Only
process 0 writes metrics and prints.

MFU is ``tokens/s * (6 N + 12 L T D) / (peak * devices)``, N the parameters
without the position table, peak the dense bf16 tensor-core rate of the device
(H100/H200 989 TFLOP/s, A100 312 TFLOP/s); it is ``null`` on a CPU or an
unknown device.

The package, by subject:

* :mod:`train.config`: ``TrainConfig``, the presets, the command line, and
  what depends on the platform (attention backend, peak FLOP/s);
* :mod:`train.step`: parameter and optimizer initialisation, the jitted
  train step, evaluation;
* :mod:`train.loop`: ``main()``, the loop (logging, evaluation, checkpoints,
  resuming);
* :mod:`train.parallel`: the mesh, the batch layout, context parallelism;
* :mod:`train.metering`: tokens/s and MFU of the logged steps;
* :mod:`train.data`, :mod:`train.checkpoint`: token streams and batches,
  Orbax checkpoints.
"""
