"""`HubUploader`: push the trained SAE (or model) with a model card to the Hugging Face Hub during training.

On every ``every_n_checkpoints``-th checkpoint (the ``on_save_checkpoint`` hook, once per step however many files
the checkpoint callbacks write), rank 0 exports the module into a local folder -- SAE modules: ``cfg.json`` +
``sae_weights.safetensors`` (a run with several SAEs: one subfolder per SAE, ``<name>/``, and one card listing
them all), modules that wrap a ``HookedViT``: ``save_pretrained`` -- writes a ``README.md`` model card, and uploads
the folder with huggingface_hub's own background upload (``HfApi.run_as_future``), so training never waits for the
network.

Every network wait is bounded: the uploader gives huggingface_hub's HTTP client a ``network_timeout`` (unless the
user installed a client of their own), and at the end of fit it waits at most ``upload_timeout`` seconds for an
upload, then warns and goes on (the folder is kept, with the command that uploads it later). Failures (no network, no
or bad token, no permission, a server that never answers) never reach training: they are logged as a WARNING with
the reason, the local folder is kept, and the upload is retried at the end of fit. At the end of fit the final
weights are uploaded too when they were not yet (``upload_at_end``).

To let others study training dynamics, each upload can also keep the export of its step in
``checkpoints/step_<step>/`` (``history``; on by default for modules wrapping a ``HookedViT``, whose exports are
small, off for SAEs), and the validation metrics of every validation run are kept in ``training_curve.json`` and
summarised in the card (first, best and last value of each accuracy / loss curve), together with the data module
and the module's hyperparameters.

The token is never a config value (configs end up in logs and checkpoints): ``huggingface_hub`` reads it from
``HF_TOKEN`` or the login cache (``hf auth login``), and it is scrubbed from any logged error message.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from prisma_lightning.utils import atomic_path

log = logging.getLogger(__name__)

CARD_FILE = "README.md"
EVAL_FILE = "eval.json"
CURVE_FILE = "training_curve.json"
HISTORY_DIR = "checkpoints"


class HubUploader(pl.Callback):
    """Upload the module's export + a model card to ``repo_id`` on checkpoints (see the module docstring).

    Args:
        repo_id: Hugging Face repo, ``<user or org>/<name>``; created (``exist_ok``) on the first upload.
        every_n_checkpoints: upload on every n-th checkpoint save.
        private: create the repo as private (an existing repo keeps its visibility).
        folder: local folder that is exported and uploaded (default ``<log_dir>/hub_upload``); kept after upload.
        upload_at_end: at the end of fit also upload the final weights if they were not uploaded yet.
        license: license identifier written into the model card's metadata.
        commit_message: commit message prefix (the step is appended).
        history: also keep each uploaded step's export in ``checkpoints/step_<step>/`` (None: on for modules
            without an ``sae``, e.g. ViT mice, whose exports are small; off for SAE modules).
        upload_timeout: at the end of fit, wait at most this many seconds for an upload; then warn and keep the
            folder.
        network_timeout: seconds any single network operation of huggingface_hub may wait (connect, read, write)
            before it fails, so no upload can hang forever.
    """

    def __init__(
        self,
        repo_id: str,
        every_n_checkpoints: int = 1,
        private: bool = True,
        folder: str | None = None,
        upload_at_end: bool = True,
        license: str = "apache-2.0",
        commit_message: str = "Upload from prisma-lightning",
        history: bool | None = None,
        upload_timeout: float = 300.0,
        network_timeout: float = 60.0,
    ) -> None:
        if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
            raise ValueError(f"repo_id must look like '<user or org>/<name>', got {repo_id!r}.")
        if every_n_checkpoints <= 0:
            raise ValueError(f"every_n_checkpoints must be a positive integer, got {every_n_checkpoints}.")
        self.repo_id, self.every_n_checkpoints, self.private = repo_id, every_n_checkpoints, private
        self.folder: Path | None = Path(folder) if folder else None
        self.upload_at_end, self.license, self.commit_message = upload_at_end, license, commit_message
        self.history = history
        if not upload_timeout > 0 or not network_timeout > 0:
            raise ValueError(
                f"upload_timeout ({upload_timeout}) and network_timeout ({network_timeout}) must be positive seconds."
            )
        self.upload_timeout, self.network_timeout = float(upload_timeout), float(network_timeout)
        self._api: Any = None
        self._future: Future | None = None
        self._card_curve_len = 0
        self.curve: list[dict[str, float]] = []
        """``{"step": ..., metric: value}`` after every validation run (rank 0)."""
        self.n_checkpoints = 0
        self.uploaded_step: int | None = None
        """Step of the last successful upload."""
        self.error: str | None = None
        """Reason of the last failed upload (None after a success)."""
        self._last_checkpoint_step: int | None = None
        self._pending = False
        self._eval_dirs: dict[str, list[Path]] = {}

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if exporter(pl_module) is None:
            raise TypeError(
                f"HubUploader cannot export a {type(pl_module).__name__}: it needs an `export(folder)` method "
                "(SAEModule, TranscoderModule) or a `model` with `save_pretrained(folder)`."
            )
        # trainer.log_dir is a collective under DDP: resolve paths here, on every rank, not in rank-0-only code.
        from prisma_lightning.utils import run_dir

        log_dir = run_dir(trainer)
        if self.folder is None:
            self.folder = log_dir / "hub_upload"
        self._eval_dirs = {}
        sae_folder = getattr(pl_module, "sae_folder", None)
        for name in _sae_names(pl_module):
            dirs = [Path(sae_folder(name))] if callable(sae_folder) else []
            self._eval_dirs[name] = dirs + ([log_dir / "sae"] if len(_sae_names(pl_module)) == 1 else [])
        if self.history is None:
            self.history = getattr(pl_module, "sae", None) is None  # SAE exports are large; ViT mice are small

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or trainer.state.fn != "fit":
            return
        point = {"step": float(trainer.global_step)}
        for key, value in trainer.callback_metrics.items():
            if getattr(value, "numel", lambda: 1)() == 1 and ("acc" in key or "loss" in key):
                point[key] = float(value)
        if len(point) > 1:
            self.curve = [p for p in self.curve if p["step"] != point["step"]] + [point]

    def state_dict(self) -> dict[str, Any]:
        return {"curve": self.curve, "n_checkpoints": self.n_checkpoints}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.curve = list(state_dict.get("curve", []))
        self.n_checkpoints = int(state_dict.get("n_checkpoints", 0))

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or step == self._last_checkpoint_step:
            return  # ranks > 0 never upload; save_last writes a second file at the same step
        self._last_checkpoint_step = step
        self.n_checkpoints += 1
        if self.n_checkpoints % self.every_n_checkpoints:
            return
        if self._future is not None and not self._future.done():
            self._pending = True  # the previous upload still reads the folder: upload the latest state at the end
            return
        if self.prepare(trainer, pl_module, step):
            self._future = self.api().run_as_future(self.upload, step)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        if not self.join(self.upload_timeout):
            self._give_up("the upload started during training")
            return
        step = trainer.global_step
        retry = self.error is not None or self._pending
        # A validation run after the last upload (e.g. at the last step) adds to the curve: upload the card again.
        stale = self.uploaded_step != step or self._card_curve_len != len(self.curve)
        if not (retry or (self.upload_at_end and stale)):
            return
        if retry:
            log.info("HubUploader: retrying the upload to %s at the end of fit.", self.repo_id)
        self._pending = False
        if self.prepare(trainer, pl_module, step):  # re-export: eval.json may have been rewritten since
            self._future = self.api().run_as_future(self.upload, step)
            if not self.join(self.upload_timeout):
                self._give_up("the final upload")
                return
        if self.error is not None:
            log.warning(
                "HubUploader: the final upload to %s failed too (%s). The files are in %s; upload them later with "
                "`hf upload %s %s`.", self.repo_id, self.error, self.folder, self.repo_id, self.folder,
            )  # fmt: skip

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.join(min(60.0, self.upload_timeout))  # let a running upload finish its commit, within bounds

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the running upload (if any) at most ``timeout`` seconds; True when none is running anymore."""
        if self._future is None:
            return True
        try:
            self._future.result(timeout=timeout)
        except TimeoutError:
            return False
        except Exception:  # noqa: BLE001 (upload() never raises; a cancelled future lands here)
            pass
        return True

    def _give_up(self, what: str) -> None:
        self.error = self.error or f"{what} did not finish within upload_timeout={self.upload_timeout:g} s"
        if self._future is not None:
            self._future.cancel()
        log.warning(
            "HubUploader: %s did not finish within %g s (the network is slow or the server does not answer); not "
            "waiting longer. The files are in %s; upload them later with `hf upload %s %s`.",
            what, self.upload_timeout, self.folder, self.repo_id, self.folder,
        )  # fmt: skip

    def api(self) -> Any:
        """The ``HfApi`` of this uploader, with bounded network waits."""
        if self._api is None:
            from huggingface_hub import HfApi

            bound_network_waits(self.network_timeout)
            self._api = HfApi()
        return self._api

    # ------------------------------------------------------------------ export and upload
    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int | None = None) -> bool:
        """Export the module and write the model card into ``folder``; False (and a warning) if that failed."""
        folder = self.folder
        step = trainer.global_step if step is None else step
        try:
            folder.mkdir(parents=True, exist_ok=True)
            names = _sae_names(pl_module)
            if len(names) > 1:  # one subfolder per SAE of a multi-SAE run
                for name in names:
                    pl_module.export(folder / name, name)
                    self._copy_eval(trainer, pl_module, folder / name, name)
            else:
                export = exporter(pl_module)
                export(folder)
                if self.history:
                    export(folder / HISTORY_DIR / f"step_{step:08d}")
                self._copy_eval(trainer, pl_module, folder, names[0] if names else None)
            if self.curve:
                with atomic_path(folder / CURVE_FILE) as tmp:
                    tmp.write_text(json.dumps(self.curve, indent=1) + "\n")
            card = model_card(pl_module, self.repo_id, self.license, folder, self.curve)
            self._card_curve_len = len(self.curve)
            with atomic_path(folder / CARD_FILE) as tmp:
                tmp.write_text(card)
        except Exception as err:  # a full disk must not stop training; the next checkpoint tries again
            self.error = _reason(err)
            log.warning("HubUploader: exporting into %s failed (%s); skipping this upload.", folder, self.error)
            return False
        return True

    def upload(self, step: int) -> None:
        """Create the repo if needed and upload ``folder`` (runs in the background thread); never raises."""
        try:
            api = self.api()
            api.create_repo(self.repo_id, private=self.private, exist_ok=True, repo_type="model")
            api.upload_folder(
                repo_id=self.repo_id, folder_path=str(self.folder), repo_type="model",
                commit_message=f"{self.commit_message} (step {step})",
            )  # fmt: skip
        except Exception as err:  # network, auth, permissions: warn, keep the folder, retry at the end of fit
            self.error = _reason(err)
            log.warning(
                "HubUploader: upload of %s to %s failed (%s); the folder is kept and the upload is retried at the end "
                "of fit.", self.folder, self.repo_id, self.error,
            )  # fmt: skip
            return
        self.error = None
        self.uploaded_step = step
        log.info("HubUploader: uploaded %s to https://huggingface.co/%s (step %d).", self.folder, self.repo_id, step)

    def _copy_eval(self, trainer: pl.Trainer, pl_module: pl.LightningModule, folder: Path, name: str | None) -> None:
        """Copy the newest ``eval.json`` written beside the module's exported SAE into the upload folder."""
        candidates = list(self._eval_dirs.get(name, [])) if name is not None else []
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
        if dirpath:
            candidates.append(Path(dirpath) / ("sae" if len(self._eval_dirs) <= 1 else f"saes/{name}"))
        files = [c / EVAL_FILE for c in candidates if (c / EVAL_FILE).is_file() and c.resolve() != folder.resolve()]
        if files:
            shutil.copyfile(max(files, key=lambda f: f.stat().st_mtime), folder / EVAL_FILE)


def _sae_names(pl_module: Any) -> list[str]:
    saes = getattr(pl_module, "saes", None)
    if saes is not None:
        return list(saes)
    return ["sae"] if getattr(pl_module, "sae", None) is not None else []


_TIMEOUT_LOCK = threading.Lock()


def bound_network_waits(seconds: float) -> None:
    """Give huggingface_hub's shared HTTP client a timeout on every wait (connect, read, write, pool), unless a
    client factory of the user's is installed. Without it the client waits forever on a server that accepts the
    connection and never answers."""
    try:
        from huggingface_hub.utils import _http
    except ImportError:
        return
    with _TIMEOUT_LOCK:
        factory = getattr(_http, "_GLOBAL_CLIENT_FACTORY", None)
        if factory is None or getattr(factory, "_prisma_timeout", None) == seconds:
            return
        if factory is not getattr(_http, "default_client_factory", None) and not hasattr(factory, "_prisma_timeout"):
            return  # the user's own client: theirs to configure
        default = _http.default_client_factory

        def bounded() -> Any:
            client = default()
            client.timeout = seconds
            return client

        bounded._prisma_timeout = seconds  # type: ignore[attr-defined]
        _http.set_client_factory(bounded)


def exporter(pl_module: pl.LightningModule) -> Any:
    """The callable that writes ``pl_module``'s shareable files into a folder, or None (duck typing)."""
    if callable(getattr(pl_module, "export", None)):
        return pl_module.export
    save_pretrained = getattr(getattr(pl_module, "model", None), "save_pretrained", None)
    return save_pretrained if callable(save_pretrained) else None


def _reason(err: BaseException) -> str:
    """``Type: message`` of an error, with the Hugging Face token (if any) blanked out."""
    text = f"{type(err).__name__}: {err}"
    try:
        from huggingface_hub import get_token

        token = get_token()
    except Exception:
        token = None
    return text.replace(token, "***") if token else text


# ---------------------------------------------------------------------------------------------------- model card
def model_card(
    pl_module: pl.LightningModule, repo_id: str, license: str, folder: Path, curve: list[dict[str, float]] | None = None
) -> str:
    """The ``README.md`` of the upload: metadata, what was trained on what, the eval table, usage and license."""
    names = _sae_names(pl_module)
    if len(names) > 1:
        return _multi_sae_card(pl_module, repo_id, license, folder, names)
    sae = getattr(pl_module, "sae", None) if names else None
    eval_file = folder / EVAL_FILE
    evaluation = _eval_table(json.loads(eval_file.read_text())) if eval_file.is_file() else None
    if sae is not None:
        rows, title, usage = _sae_facts(pl_module, sae), "Sparse autoencoder", _SAE_USAGE
        tags = ["sparse-autoencoder", "interpretability", "vision-transformer", "prisma-lightning"]
    else:
        rows, title, usage = _model_facts(pl_module), "Vision transformer", _MODEL_USAGE
        tags = ["vision-transformer", "interpretability", "prisma-lightning"]
    facts = "\n".join(f"| {key} | {value} |" for key, value in rows)
    front = "\n".join(["---", f"license: {license}", "library_name: prisma-lightning", "tags:"] +
                      [f"- {t}" for t in tags] + ["---"])  # fmt: skip
    parts = [
        front,
        f"# {repo_id}",
        f"{title} trained with prisma-lightning (PyTorch Lightning).",
        f"| | |\n| --- | --- |\n{facts}",
    ]
    if sae is not None or evaluation:
        parts.append(
            "## Evaluation\n\n" + (evaluation or "No `eval.json` was written yet (add the `SAEEvaluator` callback).")
        )
    if curve:
        parts.append("## Training curve\n\n" + _curve_summary(curve))
    training = _training_facts(pl_module)
    if training:
        parts.append("## Training\n\n" + training)
    history = sorted(p.name for p in (folder / HISTORY_DIR).glob("step_*")) if (folder / HISTORY_DIR).is_dir() else []
    if history:
        parts.append(
            f"## Checkpoints\n\nThe weights at {len(history)} training steps are in `{HISTORY_DIR}/step_<step>/` "
            f"({', '.join(h.removeprefix('step_').lstrip('0') or '0' for h in history)}); load one with "
            f'`from_pretrained("{repo_id}", subfolder="{HISTORY_DIR}/{history[-1]}")`.'
        )
    parts += [
        "## Usage\n\n" + usage.format(repo_id=repo_id),
        f"## License\n\nReleased under `{license}`. Any license of the underlying backbone and its training data "
        "applies as well.",
    ]
    return "\n\n".join(parts) + "\n"


def _multi_sae_card(pl_module: Any, repo_id: str, license: str, folder: Path, names: list[str]) -> str:
    """One card for the SAEs of a multi-SAE run: a row per SAE (its subfolder, hook, architecture, width, options
    and evaluation), how to load one."""
    lines = [
        "| SAE (subfolder) | Hook | Architecture | d_sae | Options | Explained variance % | Avg L0 | % CE recovered |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in names:
        sae = pl_module.saes[name]
        results = {}
        if (folder / name / EVAL_FILE).is_file():
            results = json.loads((folder / name / EVAL_FILE).read_text())
        options = ", ".join(f"{k}={v}" for k, v in sae.cfg.own_fields().items() if k != "architecture")

        def fmt(key: str, results: dict = results) -> str:
            value = results.get(key)
            return "n/a" if value is None else f"{value:.4g}"

        lines.append(
            f"| `{name}` | `{sae.cfg.hook_name}` | {sae.cfg.architecture} | {sae.d_sae} | {options} | "
            f"{fmt('explained_variance_pct')} | {fmt('l0')} | {fmt('ce_recovered_pct')} |"
        )
    model = next(iter(pl_module.saes.values())).cfg.model_name or getattr(pl_module, "hparams", {}).get("backbone")
    tags = ["sparse-autoencoder", "interpretability", "vision-transformer", "prisma-lightning"]
    front = "\n".join(["---", f"license: {license}", "library_name: prisma-lightning", "tags:"] +
                      [f"- {t}" for t in tags] + ["---"])  # fmt: skip
    usage = (
        "```python\nfrom prisma_lightning.sae import SparseAutoencoder\n\n"
        f'sae = SparseAutoencoder.from_pretrained("{repo_id}", subfolder="{names[0]}")\n```\n\n'
        "Each subfolder is in the SAELens layout (`cfg.json`, `sae_weights.safetensors`), so SAELens reads it too."
    )
    steps = f" after {pl_module.trainer.global_step:,} steps" if getattr(pl_module, "_trainer", None) else ""
    parts = [
        front,
        f"# {repo_id}",
        f"{len(names)} sparse autoencoders trained together on `{model or 'unknown'}`{steps} with prisma-lightning "
        "(one backbone pass feeds them all).",
        "\n".join(lines),
        "## Usage\n\n" + usage,
        f"## License\n\nReleased under `{license}`. Any license of the underlying backbone and its training data "
        "applies as well.",
    ]
    return "\n\n".join(parts) + "\n"


def _sae_facts(pl_module: pl.LightningModule, sae: Any) -> list[tuple[str, Any]]:
    cfg = sae.cfg
    hparams = getattr(pl_module, "hparams", {})
    backbone = getattr(pl_module, "_backbone", None)
    model = cfg.model_name or (backbone.cfg.model_name if backbone is not None else None) or hparams.get("backbone")
    rows: list[tuple[str, Any]] = [
        ("Model", f"`{model or 'unknown'}`"),
        ("Hook", f"`{getattr(pl_module, 'hook_name', None) or cfg.hook_name}`"),
    ]
    if getattr(cfg, "hook_name_out", None):
        rows.append(("Output hook", f"`{cfg.hook_name_out}`"))
    rows += [
        ("Tokens", getattr(pl_module, "tokens", cfg.tokens)),
        ("Architecture", f"{type(sae).__name__} (`{cfg.architecture}`)"),
        ("d_in", sae.d_in),
        ("d_sae", sae.d_sae),
    ]
    if sae.d_out != sae.d_in or getattr(cfg, "hook_name_out", None):
        rows.append(("d_out", sae.d_out))
    rows += [(name, value) for name, value in cfg.own_fields().items() if name != "architecture"]
    rows += [("Activation normalisation", cfg.normalize_activations), ("Decoder norm", cfg.decoder_norm)]
    seen = getattr(pl_module, "tokens_seen", None)
    if isinstance(seen, int | float) or hasattr(seen, "item"):
        rows.append(("Training tokens", f"{int(seen):,}"))
    if getattr(pl_module, "_trainer", None) is not None:
        rows.append(("Training steps", f"{pl_module.trainer.global_step:,}"))
    return rows


def _model_facts(pl_module: pl.LightningModule) -> list[tuple[str, Any]]:
    cfg = getattr(getattr(pl_module, "model", None), "cfg", None)
    rows: list[tuple[str, Any]] = [("Module", type(pl_module).__name__)]
    for key in ("model_name", "d_model", "n_layers", "n_heads", "patch_size", "image_size", "n_classes"):
        if cfg is not None and getattr(cfg, key, None) is not None:
            rows.append((key, getattr(cfg, key)))
    if getattr(pl_module, "_trainer", None) is not None:
        rows.append(("Training steps", f"{pl_module.trainer.global_step:,}"))
    return rows


def _curve_summary(curve: list[dict[str, float]]) -> str:
    """First, best and last value of every recorded curve (accuracy: max is best, loss: min), with their steps."""
    keys = list(dict.fromkeys(k for point in curve for k in point if k != "step"))
    lines = ["| Metric | First | Best | Last |", "| --- | --- | --- | --- |"]
    for key in keys:
        points = [(int(p["step"]), p[key]) for p in curve if key in p]
        best = (max if "acc" in key else min)(points, key=lambda sp: sp[1])
        cells = [f"{v:.4g} (step {s:,})" for s, v in (points[0], best, points[-1])]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nEvery validation run is in `{CURVE_FILE}`."


def _training_facts(pl_module: pl.LightningModule) -> str:
    """Data module and hyperparameters (plain values of ``hparams``) as markdown tables."""
    trainer = getattr(pl_module, "_trainer", None)
    lines: list[str] = []
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    if datamodule is not None:
        lines.append(f"Data: `{type(datamodule).__name__}`")
        data_rows = _plain_rows(getattr(datamodule, "hparams", {}))
        if data_rows:
            lines.append("| Data option | Value |\n| --- | --- |\n" + data_rows)
    hp_rows = _plain_rows(getattr(pl_module, "hparams", {}))
    if hp_rows:
        lines.append("| Hyperparameter | Value |\n| --- | --- |\n" + hp_rows)
    return "\n\n".join(lines)


def _plain_rows(hparams: Any) -> str:
    rows = []
    for key, value in dict(hparams).items():
        if isinstance(value, bool | int | float | str) or value is None:
            rows.append(f"| {key} | {value} |")
        elif isinstance(value, list | tuple | dict) and len(json.dumps(value, default=str)) <= 80:
            rows.append(f"| {key} | `{json.dumps(value, default=str)}` |")
    return "\n".join(rows)


def _eval_table(results: Any) -> str:
    """``eval.json`` as markdown: a metric/value table (a flat object) or one row per entry (object of objects)."""

    def fmt(value: Any) -> str:
        if value is None:
            return "n/a"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    if not isinstance(results, dict) or not results:
        return f"```json\n{json.dumps(results, indent=2)}\n```"
    if all(isinstance(v, dict) for v in results.values()):
        columns = list(dict.fromkeys(k for v in results.values() for k in v))
        head = "| | " + " | ".join(columns) + " |\n|" + " --- |" * (len(columns) + 1)
        body = "\n".join(
            f"| {name} | " + " | ".join(fmt(v.get(c)) for c in columns) + " |" for name, v in results.items()
        )
        return f"{head}\n{body}"
    rows = [f"| {k} | {fmt(v)} |" for k, v in results.items() if not isinstance(v, dict | list)]
    return "| Metric | Value |\n| --- | --- |\n" + "\n".join(rows)


_SAE_USAGE = """```python
from prisma_lightning.sae import SparseAutoencoder

sae = SparseAutoencoder.from_pretrained("{repo_id}")
feats = sae.encode(activations)  # activations [..., d_in] at the hook above
```

The folder is in the SAELens layout (`cfg.json`, `sae_weights.safetensors`), so SAELens loads it too."""

_MODEL_USAGE = """```python
from prisma_lightning.backbones import HookedViT

model = HookedViT.from_pretrained("{repo_id}")
```"""
