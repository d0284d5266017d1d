"""What DDP broadcasts from rank 0 when it wraps a LoRA model (rayft.train.ddp): the trainable
weights and the buffers, not the frozen base weights every rank loaded itself. Two real gloo
processes; each rank starts from LoRA weights of its own (another seed) and rank 1 from a
marked frozen weight, so that what is and is not broadcast shows."""

from __future__ import annotations

import datetime
import faulthandler
import json
import os
import time
from pathlib import Path

import torch.multiprocessing as mp

MARK = 0.5  # added to one frozen weight on rank 1 only


DEADLINE = 300  # s for both ranks; about 20 s on an idle 2-core machine


def _rank(rank: int, model_dir: str, out: str) -> None:
    # If a rank hangs, the failure shows where: its stacks are written before the test kills it
    stacks = open(Path(out, f"rank{rank}.stacks"), "w")  # noqa: SIM115 - open until the process ends
    faulthandler.dump_traceback_later(DEADLINE - 30, file=stacks)
    import torch
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from torch.nn.parallel import DistributedDataParallel
    from transformers import AutoModelForCausalLM

    from rayft.train.ddp import broadcast_trainable_only

    torch.set_num_threads(1)
    # A file rendezvous: no port picked in advance that another process could take in between
    dist.init_process_group(
        "gloo",
        init_method=f"file://{Path(out, 'rendezvous')}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=120),
    )
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(100 + rank)  # LoRA's random matrices differ until DDP broadcasts them
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    frozen = dict(model.named_parameters())["base_model.model.model.layers.0.mlp.up_proj.weight"]
    with torch.no_grad():
        frozen.add_(MARK * rank)
    ignored = broadcast_trainable_only(model)
    wrapped = DistributedDataParallel(model)

    def trained() -> dict[str, float]:
        return {name: p.detach().double().sum().item() for name, p in model.named_parameters() if p.requires_grad}

    after_wrap = trained()
    # A step on different data per rank: the gradients of trained weights are still averaged
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    torch.manual_seed(rank)
    ids = torch.randint(0, base.config.vocab_size, (2, 16))
    wrapped(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    Path(out, f"rank{rank}.json").write_text(
        json.dumps(
            {
                "ignored": ignored,
                "after_wrap": after_wrap,
                "after_step": trained(),
                "frozen_mark": frozen.detach().double().sum().item(),
            }
        )
    )
    dist.barrier()  # neither rank tears gloo down under the other
    dist.destroy_process_group()


def test_ddp_broadcasts_lora_weights_and_buffers_but_not_the_frozen_base(tiny_llama: Path, tmp_path: Path) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    ranks = mp.spawn(_rank, args=(str(tiny_llama), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + DEADLINE
    while not ranks.join(timeout=5):  # raises if a rank failed
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            stacks = "\n".join(f"rank {r}:\n" + (tmp_path / f"rank{r}.stacks").read_text() for r in (0, 1))
            raise AssertionError(f"the two ranks did not finish in {DEADLINE} s; their stacks:\n{stacks}")
    zero, one = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # every frozen weight is left out, and nothing that trains
    assert zero["ignored"] == one["ignored"]
    assert all(".lora_" not in name for name in zero["ignored"])
    assert "base_model.model.model.layers.0.mlp.up_proj.weight" in zero["ignored"]
    # the LoRA weights (different seeds on the two ranks) are rank 0's everywhere once wrapped,
    assert len(zero["after_wrap"]) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B) in the tiny Llama
    assert zero["after_wrap"] == one["after_wrap"]
    # and stay equal after a step on different batches (their gradients are averaged)
    assert zero["after_step"] == one["after_step"]
    assert zero["after_step"] != zero["after_wrap"]
    # the frozen weight rank 1 marked was not overwritten by rank 0's
    assert abs(one["frozen_mark"] - zero["frozen_mark"]) > 1.0
