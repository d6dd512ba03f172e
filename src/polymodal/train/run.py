"""``polymodal train``: a recipe, a data set and an output folder in; a trained model out.

The output folder holds ``model/`` (``from_pretrained``-ready), ``checkpoints/`` (Lightning,
written atomically; ``--resume`` continues from ``last.ckpt``), ``logs/`` (TensorBoard and
CSV), ``curves.png`` and ``recipe.yaml`` (the settings actually used); while a run goes,
``run.lock`` keeps a second run out of the folder.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml

from polymodal.data.dataset import Collator, DecodeOptions, MultimodalDataset
from polymodal.data.memory import LengthBucketBatchSampler, MemoryDataset, item_length, load_split
from polymodal.data.source import SkipLog
from polymodal.errors import InputError
from polymodal.modalities.image import ImageTransform
from polymodal.models import BuildContext, build_model
from polymodal.models.folder import write_file_atomically
from polymodal.train.quiet import quiet_training
from polymodal.train.recipe import Recipe, TrainerSettings, check_recipe

log = logging.getLogger("polymodal.train")


def build_context(recipe: Recipe, data: Path) -> BuildContext:
    """What a model family may read from the recipe's data when it builds its model."""
    d = recipe.data
    return BuildContext(data=data, train_split=d.train_split, fields=d.fields, image_size=d.image_size,
                        vocab_size=recipe.trainer.vocab_size)


def decode_options(recipe: Recipe) -> DecodeOptions:
    """How the recipe's data is read: image size, the data set folder as a boundary (unless
    ``data.allow_outside_paths``) and the largest file read (``data.max_file_mb``)."""
    d = recipe.data
    if d.max_file_mb <= 0:
        raise ValueError(f"data.max_file_mb must be positive, got {d.max_file_mb}")
    return DecodeOptions(image_transform=ImageTransform(d.image_size), allow_outside_paths=d.allow_outside_paths,
                         max_file_bytes=int(d.max_file_mb * 2**20))


def augmented(train_set, recipe: Recipe, model):
    """The training set wrapped in the recipe's augmentation."""
    from polymodal.data.augment import FreshCaptions, QuestionPairs
    from polymodal.data.dataset import parse_fields

    if recipe.data.augment not in ("question_pairs", "fresh_captions"):
        raise ValueError(f"unknown augmentation {recipe.data.augment!r}; known: question_pairs, fresh_captions")
    if not isinstance(train_set, MemoryDataset):
        raise ValueError(f"augment: {recipe.data.augment} needs the training split in memory (data.in_memory: true, "
                         "and within data.memory_limit_gb)")
    if recipe.data.augment == "fresh_captions":
        return FreshCaptions(train_set.items, caption_column=getattr(model.config, "caption_column", "text"),
                             seed=recipe.trainer.seed)
    fields = {f.modality: f for f in parse_fields(recipe.data.fields)}
    if "audio" not in fields:
        raise ValueError("augment: question_pairs needs an audio (spoken question) field")
    return QuestionPairs(train_set.items, fields["audio"].name,
                         question_column=fields["audio"].column, label_column=model.config.label_column,
                         seed=recipe.trainer.seed)


def cores_busy_elsewhere(seconds: float = 0.5) -> float:
    """Cores that other processes kept busy over the last ``seconds`` (Linux ``/proc``: the
    machine's busy time less this process's own); 0.0 where that cannot be read."""
    def sample() -> tuple[int, int]:
        machine = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = sum(machine) - machine[3] - (machine[4] if len(machine) > 4 else 0)  # less idle and iowait
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return busy, int(own[11]) + int(own[12])  # utime + stime of every thread of this process

    try:
        (busy0, own0), start = sample(), time.perf_counter()
        time.sleep(seconds)
        (busy1, own1), elapsed = sample(), time.perf_counter() - start
        return max(0.0, ((busy1 - busy0) - (own1 - own0)) / os.sysconf("SC_CLK_TCK") / elapsed)
    except (OSError, ValueError, IndexError):
        return 0.0


def default_threads(devices: int) -> int:
    """Torch threads per process: the cores shared out over the processes, and no more than
    ``OMP_NUM_THREADS`` when the environment sets it. When it does not, cores that other
    processes keep busy are left to them: several busy threads on too few cores spin and wait on
    each other (a two-thread training beside a one-thread one on 2 cores ran up to 15x slower;
    BENCHMARKS.md, "The demo on a busy machine")."""
    cores = os.cpu_count() or 1
    threads = max(1, cores // devices)
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return min(threads, int(env))
    if threads > 1:
        taken = round(cores_busy_elsewhere())
        if taken:
            fewer = max(1, min(threads, (cores - taken) // devices))
            if fewer < threads:
                log.info("%d of %d cores are busy with other work: %d torch thread(s) a process instead of %d",
                         taken, cores, fewer, threads)
                threads = fewer
    return threads


def atomic_checkpoint_io():
    """Lightning checkpoint I/O that writes to a uniquely named temporary file and renames it into
    place (a kill leaves the old checkpoint or the new one); the temporaries of killed writers are
    removed at the next write, so repeated kills do not pile up copies of the checkpoint."""
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            write_file_atomically(path, lambda tmp: torch.save(checkpoint, tmp))

        def load_checkpoint(self, path, map_location=None, weights_only=None):
            # weights-only whatever the caller (Lightning's resume passes None or nothing)
            return load_checkpoint(path, map_location)

    return AtomicCheckpointIO()


def load_checkpoint(path: str | os.PathLike, map_location=None) -> dict:
    """A training checkpoint (``--resume``), unpickled with ``weights_only=True`` passed
    explicitly, not left to torch's default: only tensors and plain containers, numbers and
    strings are rebuilt, and a pickle that names any other class or function is refused instead
    of run. (torch made this the default in 2.6, which is also the first release whose
    weights-only loader is safe against crafted files, CVE-2025-32434: hence ``torch>=2.6``.)
    A checkpoint that is not one is an InputError naming it."""
    import pickle
    import zipfile

    from polymodal.models.folder import one_line

    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location=map_location or "cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise InputError(path, f"not a weights-only training checkpoint: {one_line(e)}") from None
    if not isinstance(checkpoint, dict):
        raise InputError(path, f"a training checkpoint holds a dict, not {type(checkpoint).__name__}")
    return checkpoint


def build_trainer(t: TrainerSettings, out: Path, *, progress: bool = True, use_distributed_sampler: bool = True,
                  verbose: bool = False):
    """The Lightning trainer of the settings ``t``, writing under ``out``: processes,
    precision, the step budget, gradient clipping and accumulation, and the callbacks that
    work on the model from outside (weight average, validation, snapshots, checkpoints).
    ``progress``: a bar of the budget (steps, or minutes of a cap); ``verbose``: Lightning's
    model summary too."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from polymodal.train.ema import EMA
    from polymodal.train.module import PeriodicValidation, Snapshots
    from polymodal.train.report import BudgetProgress

    if t.accumulate < 1:
        raise ValueError(f"trainer.accumulate must be at least 1, got {t.accumulate}")
    if t.snapshot_every_steps is not None and t.snapshot_every_steps < 1:
        raise ValueError(f"trainer.snapshot_every_steps must be at least 1 (or null: off), got {t.snapshot_every_steps}")
    if t.gradient_clip is not None and t.gradient_clip <= 0:
        raise ValueError(f"trainer.gradient_clip must be positive (or null: off), got {t.gradient_clip}")
    callbacks = [EMA(t.ema_decay)] if t.ema_decay else []  # first: the others save and score the average
    callbacks += [PeriodicValidation(t.val_every_minutes), Snapshots(out / "snapshots", t.snapshot_every_minutes, t.snapshot_every_steps),
                  ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, save_top_k=0, every_n_train_steps=200)]
    callbacks += [BudgetProgress()] if progress else []  # steps of the budget, not Lightning's epochs
    # batch-norm statistics over the global batch, as in one process (gloo on CPUs cannot)
    sync_batchnorm = t.devices > 1 and t.accelerator != "cpu" and torch.cuda.is_available()
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, strategy="ddp" if t.devices > 1 else "auto",
        precision=t.precision, max_epochs=-1, max_steps=t.max_steps or -1,
        gradient_clip_val=t.gradient_clip, gradient_clip_algorithm="norm", accumulate_grad_batches=t.accumulate,
        sync_batchnorm=sync_batchnorm,
        logger=[TensorBoardLogger(out / "logs", name="tensorboard"), CSVLogger(out / "logs", name="csv")],
        callbacks=callbacks, plugins=[atomic_checkpoint_io()],
        enable_progress_bar=progress, log_every_n_steps=t.log_every_steps, enable_model_summary=verbose,
        num_sanity_val_steps=0, use_distributed_sampler=use_distributed_sampler,
    )


# ---- one run per output folder -----------------------------------------------------------------

LOCK_FILE = "run.lock"


class FolderBusy(InputError):
    """Another run holds the output folder."""


class RunLock:
    """Exclusive use of a run's output folder: ``OUT/run.lock``, locked with ``fcntl.flock`` and
    naming its holder (pid, host, start time).

    Why ``flock`` itself rather than the ``filelock`` package (which wraps the same call): the
    operating system drops the lock the moment its holder dies, ``kill -9`` included, so a dead run
    never blocks a folder and no timeout has to guess; what is needed beyond the bare lock — a
    holder record that a second run can read for its message, and a take-over for ``--force`` —
    is a few lines here, where a wrapper would add a dependency whose interface changed between
    major versions. A lock file that still names a holder when the lock is free was left by a run
    that died; the next run takes it with a warning. So does a run whose holder's process is gone
    from this host while the lock is still held (a data-loader worker outliving a killed run).
    ``force`` takes the folder from a live holder: the lock file is replaced, later runs see the
    new holder, and the old run — still going — is warned about, not stopped.
    """

    def __init__(self, folder: str | os.PathLike, force: bool = False):
        self.folder, self.force = Path(folder), force
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the folder, or raise :class:`FolderBusy` naming the folder and its holder."""
        try:
            import fcntl
        except ImportError:  # Windows
            log.warning("%s: no file locks on this system; a second run into this folder is not prevented",
                        self.folder)
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                gone = holder.get("host") == socket.gethostname() and not _process_alive(holder.get("pid"))
                if not (gone or self.force):
                    raise FolderBusy(self.folder, f"in use by another run ({_describe(holder)}); wait for it to "
                                     "end, or pass --force to take the folder over") from None
                self._take_over(fcntl)
                log.warning("%s: %s (%s)", self.folder, "the run holding it is gone; taking the folder over"
                            if gone else "--force: taking the folder over from a run that is still going and "
                            "may still write here", _describe(holder))
                return
            except OSError as e:  # a file system without locks (some network ones)
                os.close(fd)
                log.warning("%s: cannot lock (%s); a second run into this folder is not prevented", self.folder, e)
                return
            if not _names(self.path, fd):  # released (removed) or taken over between open and lock
                os.close(fd)
                continue
            previous = _read_holder(fd)
            self._claim(fd)
            if previous:
                log.warning("%s: the run that held it ended without releasing it (%s); taking the folder over",
                            self.folder, _describe(previous))
            return

    def _take_over(self, fcntl) -> None:
        """Replace the lock file with a new one, locked and naming this process, in one rename."""
        tmp = self.path.with_name(f".{LOCK_FILE}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else holds it
        self._claim(fd)
        os.replace(tmp, self.path)

    def _claim(self, fd: int) -> None:
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        """Give the folder back: the lock file goes (unless a forced run has replaced it)."""
        if self._fd is None:
            return
        try:
            if _names(self.path, self._fd):
                os.ftruncate(self._fd, 0)
                self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # releases the lock
            self._fd = None


def _read_holder(fd: int) -> dict:
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):  # being written this instant
        return {}
    return record if isinstance(record, dict) else {}


def _describe(holder: dict) -> str:
    if not holder:
        return "holder unknown"
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"


def _names(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        mine, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)


def _process_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return True  # unknown: assume it lives
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def spawned_rank() -> bool:
    """Whether this process is one that a launcher started as a further rank of a multi-process
    run (Lightning's DDP launcher, torchrun, SLURM): the run's first process holds the lock."""
    return any(os.environ.get(key, "0").strip() not in ("", "0")
               for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def exclusive_output(function):
    """Run ``function(recipe, data, out, ...)`` holding ``out``'s :class:`RunLock`; the extra
    keyword ``force`` takes the folder from a run that holds it."""
    @functools.wraps(function)
    def holding(recipe, data, out, *args, force: bool = False, **kwargs):
        with nullcontext() if spawned_rank() else RunLock(out, force=force):
            return function(recipe, data, out, *args, **kwargs)

    return holding


@exclusive_output
@quiet_training
def train(recipe: Recipe, data: str | os.PathLike, out: str | os.PathLike, *, resume: bool = False,
          progress: bool = True) -> Path | None:
    """Train ``recipe`` on ``data`` into ``out``; returns the model folder (None in every
    process but the first when several train together). One run at a time per ``out``: a second
    raises :class:`FolderBusy`, unless given ``force=True`` (see :func:`exclusive_output`)."""
    import lightning as L
    from torch.utils.data import DataLoader

    from polymodal.train.ema import averaged_weights
    from polymodal.train.module import TrainModule
    from polymodal.train.report import check_one_step, summary

    recipe = check_recipe(recipe)  # a recipe built in Python gets the checks of a loaded one
    data, out = Path(data), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t = recipe.trainer
    devices = t.devices
    torch.set_num_threads(t.threads or default_threads(devices))
    L.seed_everything(t.seed, workers=True, verbose=False)
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))

    model = build_model(recipe.model, build_context(recipe, data))
    options = decode_options(recipe)
    skips = SkipLog()
    fields = recipe.data.fields
    if recipe.data.in_memory:  # streamed instead when the split is estimated over data.memory_limit_gb
        train_set = load_split(data, fields, split=recipe.data.train_split, options=options, skips=skips,
                               memory_limit_gb=recipe.data.memory_limit_gb)
    else:
        train_set = MultimodalDataset(data, fields, split=recipe.data.train_split, options=options, skips=skips)
    in_memory = isinstance(train_set, MemoryDataset)
    log.info("training data: %s; %s", len(train_set) if in_memory else "streamed", skips.summary())
    if recipe.data.augment:
        train_set = augmented(train_set, recipe, model)
    if in_memory:  # a run that cannot take one step is an error, not a saved untrained model
        check_one_step(data, recipe, len(train_set), skips, options)
    per_process = max(1, recipe.data.batch_size // devices)
    common = dict(num_workers=recipe.data.num_workers, collate_fn=Collator(fields),
                  persistent_workers=recipe.data.num_workers > 0)
    bucketed = in_memory and recipe.data.bucket_by_length and devices == 1
    if bucketed:  # variable-length audio: batches of similar length waste less on padding
        items = train_set.items  # an augmented set keeps the lengths of its items
        sampler = LengthBucketBatchSampler([item_length(x) for x in items], per_process, seed=t.seed)
        loader = DataLoader(train_set, batch_sampler=sampler, **common)
    else:
        loader = DataLoader(train_set, batch_size=per_process, shuffle=in_memory, drop_last=True, **common)
    validate = None
    if recipe.data.val_split:  # decoded once; the family says what to score on it
        items = MemoryDataset(data, fields, split=recipe.data.val_split, options=options, limit=recipe.data.val_limit).items
        validate = model.validator(items, fields)
    module = TrainModule(model, lr=t.lr, weight_decay=t.weight_decay, betas=t.betas, warmup=t.warmup,
                         max_steps=t.max_steps, max_minutes=t.max_minutes, validate=validate)
    trainer = build_trainer(t, out, progress=progress, use_distributed_sampler=in_memory and not bucketed,
                            verbose=log.isEnabledFor(logging.DEBUG))
    last = out / "checkpoints" / "last.ckpt"
    trainer.fit(module, loader, ckpt_path=str(last) if resume and last.exists() else None)
    if trainer.global_step == 0:  # streamed, and not one batch came (in memory this is known before)
        check_one_step(data, recipe, None, skips, options)
    trainer.save_checkpoint(last)  # every process takes part; the first one writes
    if trainer.is_global_zero:
        with averaged_weights(trainer):  # the weights' moving average, when one is kept
            model.save_pretrained(out / "model")
        from polymodal.train.curves import plot_curves

        curves = plot_curves(out / "logs" / "csv", out / "curves.png")
        for line in summary(trainer, module, out, out / "model", curves).lines():
            log.info(line)
        return out / "model"
    return None
