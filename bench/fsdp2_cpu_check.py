"""What FSDP2 does on CPU over gloo, 2 processes, measured: torch's own `fully_shard` (full
fine-tuning, LoRA, bf16 mixed precision, CPU offload, 4-bit weights) against DDP on the same
rows, a sharded checkpoint loaded at another process count, and whether the HF trainer (through
accelerate) turns FSDP on at all for a CPU run.

    OMP_NUM_THREADS=1 python bench/fsdp2_cpu_check.py      # < 1 minute on 2 cores

Prints one line per case; bench/results/fsdp2_cpu.md records what it printed here.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import tempfile
import traceback
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

STEPS = 4


def tiny_llama(seed: int = 0) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def batches(rank: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own rows, as in data parallelism
    return [torch.randint(3, 256, (2, 32), generator=generator) for _ in range(STEPS)]


def train(model: Any, rank: int, autocast: bool = False) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for batch in batches(rank):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        mean = loss.detach().float().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / dist.get_world_size())
    return losses


def shard(model: Any, **kwargs: Any) -> Any:
    from torch.distributed.fsdp import fully_shard

    for layer in [m for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer"]:
        fully_shard(layer, **kwargs)
    return fully_shard(model, **kwargs)


def lora(model: Any) -> Any:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))


def case_ddp_full(rank: int) -> list[float]:
    from torch.nn.parallel import DistributedDataParallel

    return train(DistributedDataParallel(tiny_llama()), rank)


def case_fsdp2_full(rank: int) -> list[float]:
    return train(shard(tiny_llama()), rank)


def case_ddp_lora(rank: int) -> list[float]:
    from torch.nn.parallel import DistributedDataParallel

    return train(DistributedDataParallel(lora(tiny_llama())), rank)


def case_fsdp2_lora(rank: int) -> list[float]:
    return train(shard(lora(tiny_llama())), rank)


def case_fsdp2_bf16_mixed(rank: int) -> list[float]:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return train(shard(tiny_llama(), mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16)), rank)


def case_fsdp2_cpu_offload(rank: int) -> list[float]:
    from torch.distributed.fsdp import CPUOffloadPolicy

    return train(shard(tiny_llama(), offload_policy=CPUOffloadPolicy(pin_memory=False)), rank)


def qlora_base(rank: int) -> Any:
    """The tiny Llama with 4-bit linear layers stored in fp32 (FSDP shards by storage dtype, as
    ZeRO-3 does), LoRA on top."""
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    directory = os.path.join(os.environ["CHECK_DIR"], "base")
    if rank == 0:  # save_pretrained writes on the main process only
        tiny_llama().save_pretrained(directory)
    dist.barrier()
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_quant_storage=torch.float32,
    )
    model = LlamaForCausalLM.from_pretrained(
        directory, quantization_config=quantization, device_map={"": "cpu"}, dtype=torch.float32
    )
    for layer in model.modules():  # the bitsandbytes AVX512-BF16 trap (STACK.md), as rayft.model does
        if type(layer).__name__ == "Linear4bit":
            layer.support_avx512bf16_for_cpu = False
    return lora(model)


def case_ddp_qlora(rank: int) -> list[float]:
    from torch.nn.parallel import DistributedDataParallel

    return train(DistributedDataParallel(qlora_base(rank)), rank)


def case_fsdp2_qlora(rank: int) -> list[float]:
    return train(shard(qlora_base(rank)), rank)


def case_dcp_reshard(rank: int) -> list[float]:
    """A sharded (DCP) checkpoint saved by 2 ranks, read back as one full state dict: what a
    resume at another worker count needs."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    model = shard(tiny_llama())
    train(model, rank)
    directory = os.environ["CHECK_DIR"]
    dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=os.path.join(directory, "dcp"))
    full = {name: tensor.full_tensor() for name, tensor in model.state_dict().items()}
    dist.barrier()
    if rank == 0:
        dcp_to_torch_save(os.path.join(directory, "dcp"), os.path.join(directory, "full.pt"))
        loaded = torch.load(os.path.join(directory, "full.pt"))["model"]
        worst = max(float((loaded[name] - full[name]).abs().max()) for name in full)
        return [worst]
    return [0.0]


def case_hf_trainer_fsdp_flag(rank: int) -> list[float]:
    """The HF trainer with fsdp=True on CPU: does accelerate turn FSDP on? (1.0 yes, 0.0 no)"""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    rows = [{"input_ids": b[0].tolist(), "labels": b[0].tolist()} for b in batches(0)]
    args = TrainingArguments(
        output_dir=os.environ["CHECK_DIR"],
        use_cpu=True,
        fsdp=True,
        fsdp_config={"version": 2},
        max_steps=1,
        per_device_train_batch_size=1,
        report_to="none",
        save_strategy="no",
    )
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=Dataset.from_list(rows))
    trainer.train()
    from torch.distributed.fsdp import FSDPModule

    wrapped = isinstance(trainer.model_wrapped, FSDPModule) or isinstance(trainer.model, FSDPModule)
    return [float(trainer.is_fsdp_enabled), float(wrapped)]


CASES = [name for name in globals() if name.startswith("case_")]


def worker(rank: int, port: int, directory: str, results: Any) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": "2"})
    os.environ.update({"LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2", "CHECK_DIR": directory})
    torch.set_num_threads(1)
    # a case failing on one rank must not leave the other waiting forever in a collective
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    for name in CASES:
        try:
            value: Any = globals()[name](rank)
        except Exception as exc:
            value = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            if os.environ.get("CHECK_TRACE"):
                traceback.print_exc()
        if rank == 0:
            results[name] = value
        dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    manager = mp.Manager()
    results = manager.dict()
    with tempfile.TemporaryDirectory() as directory:
        mp.spawn(worker, args=(port, directory, results), nprocs=2, join=True)
    out = dict(results)
    if "--json" in sys.argv:
        print(json.dumps({name[5:]: value for name, value in out.items()}))
        return 0
    for name in CASES:
        value = out.get(name)
        reference = out.get("case_ddp_" + name[len("case_fsdp2_") :].split("_")[0]) or out.get("case_ddp_full")
        line = f"{name[5:]:28s} {json.dumps(value)}"
        if isinstance(value, list) and isinstance(reference, list) and name.startswith("case_fsdp2"):
            worst = max(abs(a - b) / abs(a) for a, b in zip(reference, value))
            line += f"   max relative gap to DDP per step: {worst:.2e}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
