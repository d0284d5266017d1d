"""The `rayft` command: parse -> spec -> one driver call -> readable output. Thin on purpose:
each command loads its spec, connects to Ray when it needs to, calls one layer below, prints.
Heavy modules are imported inside the commands, so `rayft --help` and `validate` start fast."""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import importlib
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from rayft.cli.views import console, log
from rayft.errors import RayftError
from rayft.model.gguf_export import DEFAULT_QUANTIZATION as GGUF_DEFAULT
from rayft.model.gguf_export import QUANTIZATIONS as GGUF_QUANTIZATIONS
from rayft.quiet import quiet_env, silence_libraries
from rayft.spec import JobSpec, load_spec

# Before transformers/peft pull in DeepSpeed and bitsandbytes, which warn at import; commands
# that load models in this process (export, generate, chat) print no progress bars either.
os.environ.update({k: v for k, v in quiet_env().items() if k not in os.environ})
warnings.filterwarnings("ignore", category=FutureWarning)  # libraries' deprecations, not the user's
silence_libraries()

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Ray-native supervised fine-tuning: one YAML spec, any cluster size.",
)
data_app = typer.Typer(no_args_is_help=True, help="Inspect the data pipeline's output.")
app.add_typer(data_app, name="data")

SpecArg = typer.Argument(..., exists=False, help="Job spec (YAML).")
OverridesArg = typer.Argument(None, help="Dotted overrides, e.g. train.learning_rate=1e-4")
ProfileOpt = typer.Option([], "--profile", "-p", help="Profile YAML overlaid on the spec (repeatable).")
AddressOpt = typer.Option(
    None, "--address", envvar="RAY_ADDRESS", help="Ray cluster address; default: embedded local Ray."
)
VerboseOpt = typer.Option(False, "--verbose", "-v", help="Show worker logs.")


DEBUG = {"traceback": False}  # --debug: show the traceback of every error


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show the full traceback of any error.")) -> None:
    """Ray-native supervised fine-tuning: one YAML spec, any cluster size."""
    DEBUG["traceback"] = debug


def friendly(command: Callable[..., Any]) -> Callable[..., Any]:
    """Errors a user can act on are printed as one message, not a traceback; so is anything
    else that goes wrong (`--debug` shows the traceback)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except RayftError as exc:
            if DEBUG["traceback"]:
                console.print_exception()
            console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]: rerun the same command to resume from the last checkpoint")
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as exc:  # not ours to explain: say what and where, briefly
            if DEBUG["traceback"]:
                raise
            lines = [line for line in str(exc).strip().splitlines() if line.strip()]
            console.print(
                f"[bold red]error:[/] {type(exc).__name__}: {escape(lines[-1] if lines else '')}\n"
                "(rayft --debug COMMAND ... shows the traceback)",
                soft_wrap=True,
            )
            raise typer.Exit(1) from None

    return wrapper


def _load(spec_path: Path, overrides: Optional[list[str]], profile: list[Path]) -> JobSpec:
    return load_spec(spec_path, profiles=list(profile), overrides=overrides or [])


TOKENIZER_MODULE = "transformers.models.auto.tokenization_auto"  # AutoTokenizer and all it imports (torch too)


def _import_ahead(name: str) -> None:
    """An import done early in a thread; if it fails, the real import later says why, properly."""
    with contextlib.suppress(Exception):
        importlib.import_module(name)


def _connect(
    address: Optional[str],
    verbose: bool = False,
    quiet: bool = False,
    dashboard: bool = False,
    prestart: bool = False,
    meanwhile: Optional[Callable[[], None]] = None,
) -> None:
    """Connect to Ray (rayft.launch.cluster.connect) and say where. ray.init mostly waits for
    Ray's own processes to come up (about 5 s for an embedded one, the driver's core idle;
    bench/results/startup.md), so `meanwhile`, the command's work that needs no Ray (the job's
    preflight, its imports), runs in a thread alongside; by default, transformers' tokenizer
    imports, which every command that connects needs next. Its error (a problem with the job)
    is raised in preference to a failure to connect.

    Joined before anything else imports transformers: it is a lazy module, and a second thread
    importing from it half-initialized gets ImportError (seen with a cluster that connects fast)."""
    from rayft.launch.cluster import connect

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rayft-meanwhile") as pool:
        alongside = pool.submit(meanwhile or functools.partial(_import_ahead, TOKENIZER_MODULE))
        try:
            where = connect(address, verbose=verbose, dashboard=dashboard, prestart=prestart)
        finally:
            alongside.result()
    if not quiet:
        log(f"ray: {where}")


def _check_and_import(job: JobSpec, *modules: str) -> Callable[[], None]:
    """`meanwhile` work for a command that runs the job: its preflight, and the modules it
    imports after connecting. Its quick part (the files exist) runs now: a mistyped path fails
    before Ray starts."""
    from rayft.train.preflight import check_files

    check_files(job)

    def check() -> None:
        from rayft.train.preflight import preflight

        for module in modules:
            importlib.import_module(module)
        preflight(job)

    return check


def _write_report(run_dir: str) -> None:
    """The run's report, and the model cards (README.md) of its model directories."""
    from rayft.cli.views import print_report_written
    from rayft.eval.card import write_run_cards
    from rayft.eval.report import build_report

    print_report_written(build_report(run_dir))
    for card in write_run_cards(run_dir):
        log(f"model card: {card}")


def _record_command(run_dir: Any) -> None:
    """<run>/command.json: the command that made the run, for its model cards."""
    import json

    from rayft import storage

    storage.write_text(run_dir.command, json.dumps({"command": _command_line()}, indent=2))


@app.command()
@friendly
def validate(
    spec: Path = SpecArg, overrides: Optional[list[str]] = OverridesArg, profile: list[Path] = ProfileOpt
) -> None:
    """Print the fully resolved spec (defaults filled in, secrets hidden) or what is wrong.

    Example:

      rayft validate configs/qwen2.5-7b-qlora.yaml -p configs/profiles/gpu-1xL4.yaml
    """
    import yaml

    from rayft.train.preflight import preflight

    job = _load(spec, overrides, profile)
    preflight(job)  # the model, data files, template, DeepSpeed file and storage too
    console.print(yaml.safe_dump(job.to_dict(), sort_keys=False).rstrip())
    console.print(
        f"[green]valid[/]: gradient accumulation {job.gradient_accumulation_steps}, precision {job.precision}",
        soft_wrap=True,
    )


@app.command()
@friendly
def train(
    spec: Path = SpecArg,
    overrides: Optional[list[str]] = OverridesArg,
    profile: list[Path] = ProfileOpt,
    address: Optional[str] = AddressOpt,
    fresh: bool = typer.Option(False, "--fresh", help="Start over instead of resuming."),
    compare: bool = typer.Option(True, "--compare/--no-compare", help="Base vs tuned on held-out prompts at the end."),
    verbose: bool = VerboseOpt,
) -> None:
    """Fine-tune as the spec says; resumes a run with the same name unless --fresh.

    Examples:

      rayft train configs/quickstart.yaml

      rayft train configs/llama3.2-1b-lora.yaml -p configs/profiles/gpu-1xL4.yaml train.learning_rate=1e-4
    """
    job = _load(spec, overrides, profile)
    # Ray Train's own imports (2 s), better while Ray starts than while the workers import theirs
    imports = ("rayft.train.driver", "rayft.train.controller", "rayft.eval.compare")
    _connect(address, verbose, meanwhile=_check_and_import(job, *imports))
    from rayft.cli.views import print_comparison, print_held_out_loss, print_summary
    from rayft.eval.compare import before_after
    from rayft.train.driver import fit
    from rayft.train.run import plan_run

    plan = plan_run(job, log=log, fresh=fresh, checked=True)
    summary = fit(plan, log=log)
    _record_command(plan.run_dir)  # after fit: --fresh clears the directory first, and refuses one it did not make
    print_summary(summary)
    if compare and job.eval.before_after:
        log(f"eval: held-out loss and answers to {job.eval.num_prompts} held-out prompts, base and tuned models")
        comparison = before_after(plan, summary)
        print_held_out_loss(comparison)
        if comparison.prompts:
            print_comparison(comparison)
    _write_report(plan.run_dir.path)


@app.command()
@friendly
def tune(
    spec: Path = SpecArg,
    overrides: Optional[list[str]] = OverridesArg,
    profile: list[Path] = ProfileOpt,
    address: Optional[str] = AddressOpt,
    fresh: bool = typer.Option(False, "--fresh", help="Start the sweep over."),
    verbose: bool = VerboseOpt,
) -> None:
    """Sweep the spec's tune.search_space: every trial a multi-worker run; resumes when rerun.

    Example:

      rayft tune configs/sweep-quickstart.yaml
    """
    from rayft.cli.views import print_sweep
    from rayft.tune.sweep import sweep

    job = _load(spec, overrides, profile)
    _connect(address, verbose, dashboard=True)  # for Ray Train's placement-group cleaner (rayft.launch.cluster)
    result = sweep(job, fresh=fresh, log=log)
    print_sweep(result)
    failed = [trial for trial in result.trials if trial.status == "failed"]
    if result.trials and len(failed) == len(result.trials):
        raise RayftError(f"every trial of sweep {result.name} failed ({len(failed)}); the first: {failed[0].error}")


@app.command()
@friendly
def prepare(
    spec: Path = SpecArg,
    overrides: Optional[list[str]] = OverridesArg,
    profile: list[Path] = ProfileOpt,
    address: Optional[str] = AddressOpt,
    force: bool = typer.Option(False, "--force", help="Ignore the cache."),
    verbose: bool = VerboseOpt,
) -> None:
    """Run the data pipeline on Ray Data (or reuse its cache) and print its statistics.

    Example:

      rayft prepare configs/quickstart.yaml --force
    """
    job = _load(spec, overrides, profile)
    # prestart: its first act is a read task per CPU
    _connect(address, verbose, prestart=True, meanwhile=_check_and_import(job, "rayft.data.prepare"))
    from rayft.data.prepare import prepare as run_prepare
    from rayft.model import load_tokenizer, materialized_dir
    from rayft.train.preflight import check_cluster_paths

    check_cluster_paths(job, run_storage=False)
    prepared = run_prepare(job, load_tokenizer(job, materialized_dir(job)), force=force, log=log)
    log(f"prepared: {prepared.root}")


@data_app.command("preview")
@friendly
def data_preview(
    spec: Path = SpecArg,
    overrides: Optional[list[str]] = OverridesArg,
    profile: list[Path] = ProfileOpt,
    count: int = typer.Option(3, "--count", "-n", help="Examples to show."),
    split: str = typer.Option("train", help="train or eval"),
    address: Optional[str] = AddressOpt,
) -> None:
    """A few processed examples with the trained tokens highlighted, and the data statistics.

    Example:

      rayft data preview configs/quickstart.yaml -n 5
    """
    job = _load(spec, overrides, profile)
    _connect(address, quiet=True, meanwhile=_check_and_import(job, "rayft.cli.preview"))
    from rayft.cli.preview import preview

    preview(job, console, count=count, split=split)


@app.command()
@friendly
def export(
    model: Path = typer.Argument(..., help="A run directory, a checkpoint, or a model directory."),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", "--output-dir", help="Where to write; default: <run>/export for a run."
    ),
    merge: bool = typer.Option(
        False, "--merge", "--merge-lora", help="Fold a LoRA adapter into its base (QLoRA: a dequantized base)."
    ),
    gguf: bool = typer.Option(False, "--gguf", help="Write a GGUF file of the merged model (llama.cpp, Ollama)."),
    quant: Optional[str] = typer.Option(
        None,
        "--quant",
        "--quantization",
        "--outtype",
        "-q",
        help=f"GGUF tensor type: {', '.join(GGUF_QUANTIZATIONS)} (default {GGUF_DEFAULT}); implies --gguf.",
    ),
    ollama: bool = typer.Option(
        False, "--ollama", help="Also write an Ollama Modelfile (chat template, stop tokens); implies --gguf."
    ),
    name: Optional[str] = typer.Option(None, "--name", help="The model's name in the files; default: the run's."),
    push_to_hub: Optional[str] = typer.Option(
        None, "--push-to-hub", "--hub-model-id", help="Upload the exported directory to this hub repo (HF_TOKEN)."
    ),
    private: bool = typer.Option(False, "--private", help="Create the hub repo private."),
) -> None:
    """Save a trained model for serving: a Hugging Face directory (safetensors), a GGUF file, an
    Ollama Modelfile; each export with its model card (README.md).

    Examples:

      rayft export runs/quickstart --merge                        # merged safetensors in runs/quickstart/export

      rayft export runs/quickstart --gguf --quant q8_0 --ollama   # then: cd runs/quickstart/export && ollama create ...

      rayft export runs/quickstart --merge --gguf --push-to-hub me/quickstart-sft
    """
    from rayft.eval.card import write_export_card
    from rayft.model.trained import default_export_dir
    from rayft.model.trained import export as run_export

    gguf_type = quant or (GGUF_DEFAULT if gguf or ollama else None)
    out_dir = out or default_export_dir(model)
    exported = run_export(model, out_dir, merge=merge, gguf=gguf_type, ollama=ollama, name=name)
    card = write_export_card(exported, command=_command_line(), repo_id=push_to_hub)
    for line in _export_lines(exported, card):
        log(line)
    if push_to_hub:
        from rayft.model.hub import push_to_hub as push

        pushed = push(exported.out_dir, push_to_hub, private=private)
        log(f"pushed {pushed.files} files to https://huggingface.co/{pushed.repo_id}: {pushed.commit_url}")


def _export_lines(exported: Any, card: str) -> list[str]:
    what = {
        "adapter": "LoRA adapter",
        "full": "full model",
        "merged": "merged model (safetensors)",
        "gguf": "GGUF",
    }[exported.kind]
    lines = [f"exported {what} -> {exported.out_dir}"]
    if exported.gguf:
        file = exported.gguf
        lines.append(f"  gguf: {file.path} ({file.quantization}, {file.bytes / 1e6:,.1f} MB, {file.tensors} tensors)")
    if exported.modelfile:
        tag = exported.ollama_name
        lines.append(
            f"  ollama: {exported.modelfile} ({exported.chat_family or 'the GGUF chat template'}): "
            f"cd {exported.out_dir} && ollama create {tag} -f Modelfile && ollama run {tag}"
        )
    lines.append(f"  model card: {card}")
    return lines


def _command_line() -> str:
    """The command as typed (`rayft ...`), secrets hidden: what a model card says made the model."""
    import shlex

    from rayft.spec.secrets import redact_command

    return shlex.join(["rayft", *redact_command(sys.argv[1:])])


@app.command()
@friendly
def generate(
    model: Path = typer.Argument(..., help="A run directory, a checkpoint, or a model directory."),
    prompt: Optional[str] = typer.Argument(None, help="One prompt; or use --file."),
    file: Optional[Path] = typer.Option(
        None, "--file", "-f", help="Prompts: .txt (one per line) or .jsonl (prompt/messages)."
    ),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens"),
    sample: bool = typer.Option(False, "--sample", help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(0.7),
    system: Optional[str] = typer.Option(None, help="A system prompt."),
) -> None:
    """Answer prompts with a trained model, using its chat template.

    Examples:

      rayft generate runs/quickstart "What is 7 + 5?"

      rayft generate runs/quickstart -f prompts.jsonl --max-new-tokens 64
    """
    from rayft.cli.chat import prompts_from
    from rayft.eval.generation import generate as run_generate
    from rayft.model.trained import load_trained

    prompts = prompts_from(prompt, file, system)
    loaded, tokenizer = load_trained(str(model))
    answers, _ = run_generate(
        loaded, tokenizer, prompts, max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature
    )
    for item, answer in zip(prompts, answers):
        console.print(f"[bold]> {escape(item.messages[-1]['content'])}[/]\n{escape(answer)}\n", soft_wrap=True)


@app.command()
@friendly
def chat(
    model: Path = typer.Argument(..., help="A run directory, a checkpoint, or a model directory."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens"),
    system: Optional[str] = typer.Option(None),
) -> None:
    """Talk to a trained model. /reset starts over, /exit (or Ctrl-D) leaves.

    Example:

      rayft chat runs/quickstart --system "Answer briefly."
    """
    from rayft.cli.chat import chat_loop
    from rayft.model.trained import load_trained

    loaded, tokenizer = load_trained(str(model))
    chat_loop(loaded, tokenizer, console, max_new_tokens=max_new_tokens, system=system)


@app.command()
@friendly
def plan(
    spec: Path = SpecArg,
    overrides: Optional[list[str]] = OverridesArg,
    profile: list[Path] = ProfileOpt,
    tokens: Optional[int] = typer.Option(
        None, "--tokens", help="Training tokens an epoch; default: the prepared data's."
    ),
    accelerator: Optional[str] = typer.Option(
        None, "--accelerator", help="A100-80G, H100-80G, H200, L4, A10G, T4 or cpu."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Will the job fit, and how long will it take? From the model's config alone, before renting a GPU.

    Example:

      rayft plan configs/llama3.1-8b-qlora.yaml -p configs/profiles/gpu-1xA100-80G.yaml --tokens 20000000
    """
    from rayft.cli.plan_view import render
    from rayft.plan import estimate

    result = estimate(_load(spec, overrides, profile), tokens=tokens, accelerator=accelerator)
    if as_json:
        console.print_json(data=result.to_dict())
    else:
        render(result, console)


@app.command("eval")
@friendly
def eval_(
    spec: Path = SpecArg,
    overrides: Optional[list[str]] = OverridesArg,
    profile: list[Path] = ProfileOpt,
    checkpoint: Optional[str] = typer.Option(
        None, "--checkpoint", help="A run, checkpoint or model directory to evaluate; default: the spec's finished run."
    ),
    harness_task: list[str] = typer.Option(
        [], "--harness-task", help="lm-evaluation-harness task to run on base and tuned (repeatable; needs lm-eval)."
    ),
    harness_include: Optional[Path] = typer.Option(
        None, "--harness-include", help="A directory of lm-eval task YAML files."
    ),
    harness_limit: Optional[int] = typer.Option(
        None, "--harness-limit", help="At most this many examples a harness task."
    ),
    address: Optional[str] = AddressOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Base vs tuned on the held-out data: loss, perplexity, answers and their scores; then the report.

    Examples:

      rayft eval configs/quickstart.yaml

      rayft eval configs/quickstart.yaml --checkpoint runs/quickstart/checkpoint_000020
    """
    job = _load(spec, overrides, profile)
    _connect(address, verbose, meanwhile=_check_and_import(job, "rayft.eval.compare", "rayft.train.run"))
    from rayft.cli.views import print_comparison, print_held_out_loss
    from rayft.eval.compare import evaluate_run
    from rayft.train.run import plan_run

    plan = plan_run(job, log=log, resume=False, checked=True)
    comparison, saved = evaluate_run(plan, checkpoint)
    print_held_out_loss(comparison)
    if comparison.prompts:
        print_comparison(comparison)
    log(f"eval: saved {saved}")
    if harness_task:
        from rayft.eval.harness import evaluate_run_on_tasks

        results, saved = evaluate_run_on_tasks(
            plan,
            harness_task,
            checkpoint,
            include_path=str(harness_include) if harness_include else None,
            limit=harness_limit,
        )
        console.print_json(data=results)
        log(f"eval: saved {saved}")
    if checkpoint is None:  # the report describes the run's final model
        _write_report(plan.run_dir.path)


@app.command()
@friendly
def report(
    run: str = typer.Argument(..., help="A run directory (<run.storage_path>/<run.name>), local or s3:// gs://."),
) -> None:
    """Rebuild a run's report: <run>/report/report.md, report.html and the PNG plots.

    Example:

      rayft report runs/quickstart
    """
    _write_report(run)


JobAddressOpt = typer.Option(
    None, "--address", envvar="RAY_API_SERVER_ADDRESS", help="The cluster's job server, e.g. http://HEAD:8265."
)
jobs_app = typer.Typer(no_args_is_help=True, help="Jobs on a Ray cluster's job server.")
app.add_typer(jobs_app, name="jobs")


@app.command()
@friendly
def submit(
    spec: Path = SpecArg,
    overrides: Optional[list[str]] = OverridesArg,
    profile: list[Path] = ProfileOpt,
    address: Optional[str] = JobAddressOpt,
    working_dir: Path = typer.Option(Path("."), "--working-dir", help="What to upload (the repository root)."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Follow the job's output until it ends."),
    fresh: bool = typer.Option(False, "--fresh", help="Start the run over instead of resuming it."),
) -> None:
    """Run the job on a cluster through Ray's job server; the exit code is the job's.

    Example:

      rayft submit configs/quickstart.yaml --address http://HEAD:8265
    """
    from rayft.launch import submit as jobs

    job = _load(spec, overrides, profile)
    job_id, status = jobs.submit(
        job,
        spec,
        overrides=overrides or [],
        fresh=fresh,
        profiles=profile,
        address=address,
        working_dir=working_dir,
        follow=wait,
        log=log,
    )
    log(f"job {job_id}: {status}")
    raise typer.Exit(jobs.EXIT_CODES.get(status, 0) if wait else 0)


@jobs_app.command("list")
@friendly
def jobs_list(address: Optional[str] = JobAddressOpt) -> None:
    """Jobs on the cluster, oldest first.

    Example:

      rayft jobs list --address http://HEAD:8265
    """
    from rayft.launch import submit as jobs

    table = Table(show_header=True)
    for column in ("job", "status", "run"):
        table.add_column(column, no_wrap=True)  # ids are copied into other commands: keep them whole
    table.add_column("entrypoint", overflow="fold")
    for row in jobs.list_jobs(address):
        table.add_row(row["job"], row["status"], row["run"], row["entrypoint"])
    console.print(table)


@jobs_app.command("logs")
@friendly
def jobs_logs(
    job_id: str,
    address: Optional[str] = JobAddressOpt,
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep streaming until the job ends."),
) -> None:
    """A job's output.

    Example:

      rayft jobs logs rayft-quickstart-1a2b --follow
    """
    from rayft.launch import submit as jobs

    jobs.logs(address, job_id, follow, log=log)


@jobs_app.command("stop")
@friendly
def jobs_stop(job_id: str, address: Optional[str] = JobAddressOpt) -> None:
    """Stop a running job (its run resumes from the last checkpoint when submitted again).

    Example:

      rayft jobs stop rayft-quickstart-1a2b
    """
    from rayft.launch import submit as jobs

    log(f"job {job_id}: {jobs.stop(address, job_id)}")


k8s_app = typer.Typer(no_args_is_help=True, help="Kubernetes (KubeRay) manifests from a job spec.")
app.add_typer(k8s_app, name="k8s")


@k8s_app.command("render")
@friendly
def k8s_render(
    spec: Path = SpecArg,
    overrides: Optional[list[str]] = OverridesArg,
    profile: list[Path] = ProfileOpt,
    image: Optional[str] = typer.Option(
        None, "--image", help="Image built from k8s/Dockerfile; default rayft:VERSION[-gpu]."
    ),
    namespace: Optional[str] = typer.Option(None, "--namespace", "-n", help="Default: kubectl's current namespace."),
    storage: Optional[str] = typer.Option(
        None, "--storage", help="PVC for a local run.storage_path (default rayft-runs)."
    ),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the YAML here instead of stdout."),
) -> None:
    """A RayJob and the ConfigMap with its spec, sized by the spec: pipe into `kubectl apply -f -`.

    Example:

      rayft k8s render configs/llama3.1-8b-qlora.yaml -p configs/profiles/gpu-1xA100-80G.yaml | kubectl apply -f -
    """
    from rayft.launch import k8s

    job = _load(spec, overrides, profile)
    text = k8s.to_yaml(
        k8s.render(
            job,
            spec_path=str(spec),
            image=image,
            namespace=namespace,
            storage=storage,
            profiles=[str(p) for p in profile],
            overrides=overrides or [],
        )
    )
    if output is None:
        sys.stdout.write(text)  # not rich: YAML must reach kubectl unwrapped and unstyled
    else:
        output.write_text(text)
        log(f"wrote {output}: kubectl apply -f {output}")
