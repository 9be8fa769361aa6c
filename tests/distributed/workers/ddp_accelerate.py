"""accelerate DDP on CPU ranks: each rank trains on its own slice of every global batch.

Under torchrun (2 ranks) it asserts world size 2 and a DDP-wrapped model; run as one plain process it trains on the
whole global batch (the reference the test compares with). Writes rank<r>.json: losses, the final prompt, saves.
`--fault crash|hang` makes rank 1 die or hang at step 2 (the test then expects a fast failure, not a hang).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from common import global_batches, pg_timeout, prompt_of, soft_prompt_model, write_result
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel

from peft_softprompt_ext.trainer import save_adapter

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--steps", type=int, default=6)
parser.add_argument("--rows", type=int, default=8, help="rows of each GLOBAL batch")
parser.add_argument("--expect-world", type=int, default=2)
parser.add_argument("--fault", choices=["none", "crash", "hang"], default="none")
args = parser.parse_args()

accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=pg_timeout())])
rank, world = accelerator.process_index, accelerator.num_processes
assert world == args.expect_world, f"world size {world}, expected {args.expect_world}: ranks are not connected"
assert args.rows % world == 0

model = soft_prompt_model(seed=0, num_virtual_tokens=4)
model.train()
initial = prompt_of(model)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2, weight_decay=0.0)
model, optimizer = accelerator.prepare(model, optimizer)
if world > 1:
    assert isinstance(model, DistributedDataParallel), type(model)

per_rank = args.rows // world
losses = []
for step, batch in enumerate(global_batches(args.steps, args.rows)):
    if args.fault != "none" and rank == 1 and step == 2:
        if args.fault == "crash":
            raise RuntimeError("injected fault: rank 1 dies at step 2")
        time.sleep(3600)  # injected hang: rank 0 must time out in its next collective
    ids = batch[rank * per_rank : (rank + 1) * per_rank]
    loss = model(input_ids=ids, labels=ids).loss
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
    losses.append(accelerator.reduce(loss.detach(), reduction="mean").item())

prompt = prompt_of(model)
inner = accelerator.unwrap_model(model)
# 1) rank 0 alone saves (the usual `if is_main_process:` pattern): must not start a collective
only0 = os.path.join(args.out, "rank0_only")
if accelerator.is_main_process:
    inner.save_pretrained(only0)
accelerator.wait_for_everyone()
# 2) every rank calls save_adapter: gathered, written once, atomically
save_adapter(model, os.path.join(args.out, "all_ranks"))
saved = {
    name: load_file(os.path.join(args.out, name, "adapter_model.safetensors"))["prompt_embeddings"].tolist()
    for name in ("rank0_only", "all_ranks")
}
write_result(
    args.out,
    rank,
    world=world,
    wrapped=type(model).__name__,
    losses=losses,
    prompt=prompt.tolist(),
    initial=initial.tolist(),
    saved=saved,
    pid=os.getpid(),
)
accelerator.end_training()
sys.exit(0)
