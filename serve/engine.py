"""The generation worker: one thread owns the model and decodes every live request together.

Requests wait in a bounded queue. Each turn of the worker loop (1) admits waiting requests while the batch has
room, prefilling all new arrivals in one left-padded forward pass and sampling their first token, (2) drops rows
whose client went away, and (3) runs one decode step for every row in the batch. A batch of 8 rows costs little
more than a batch of 1 on CPU (the weights are read once per step either way), which is where concurrent
throughput comes from.

The event loop never touches torch: `submit` (called on the loop) enqueues, and the worker hands each step's
output back with one `loop.call_soon_threadsafe` for all its requests. `RequestHandle.cancel` (a disconnect) is
noticed at the next step.

Two decode paths share this loop: "static" (the default) keeps rows in the fixed slots of `static_cache.SlotBatch`
and decodes with the hand-written `decode_step.DecodeStep`; "dynamic" keeps them in `kv_batch.KVBatch` and
decodes through the model's own forward (also the fallback for configs the static step does not implement).
Prefills always run through the model's own forward.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

import torch

from . import cpu, kernel_choice, linear_choice, packed_linear
from .decode_step import DecodeStep
from .detokenize import IncrementalDetokenizer
from .kv_batch import KVBatch
from .quantize import Int8Linear, quantize_head, quantize_linears
from .quantize import available as int8_kernels
from .sampling import RowState, RequestSampling, make_generator, sample
from .static_cache import SlotBatch
from .stops import StopStringFilter
from .threads import ThreadChooser

log = logging.getLogger("serve.engine")


class Overloaded(Exception):
    """The queue is full: the API answers 429."""


class EngineFailure(Exception):
    """Generation itself failed (not the request's fault); carries the message sent to the client."""


@dataclass
class TokenLogprob:
    token_id: int
    text: str
    logprob: float
    top: list[tuple[int, str, float]]  # (id, text, logprob) alternatives, most likely first


@dataclass
class ChoiceDelta:
    """New output for one choice of one request, from one worker step."""

    index: int
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: str | None = None  # "stop" | "length" on the choice's last delta


@dataclass
class RequestHandle:
    """The API side of a submitted request: iterate `deltas()`; call `cancel()` when the client leaves."""

    prompts: list[list[int]]  # token ids per prompt; choice i continues prompts[i // n]
    params: RequestSampling
    n: int
    loop: asyncio.AbstractEventLoop
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    completion_tokens: int = 0  # written by the worker
    unfinished: int = 0  # choices not yet finished, counted against the queue limit (worker-owned)
    submitted_at: float = field(default_factory=time.perf_counter)
    _cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.n

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    async def deltas(self):
        """Yield lists of `ChoiceDelta` until every choice has finished; raises `EngineFailure`."""
        remaining = self.choices
        while remaining:
            item = await self.queue.get()
            if isinstance(item, EngineFailure):
                raise item
            remaining -= sum(d.finish_reason is not None for d in item)
            yield item


@dataclass
class _Row:
    """One choice of one request, decoding in the batch."""

    handle: RequestHandle
    index: int
    state: RowState
    detokenizer: IncrementalDetokenizer
    stops: StopStringFilter
    next_token: int = -1
    finished: bool = False


DECODE_PATHS = ("static", "dynamic")
QUANTIZE = (None, "int8")
DTYPES = ("auto", "float32", "bfloat16")
# Linears the dynamic path keeps in float32 under bfloat16, as the static step does: dt_proj picks DMA's top-k
# keys and CDMoE's router_gate picks experts, discrete choices a rounding flips.
KEEP_FLOAT32 = ("dt_proj", "router_gate")


def resolve_dtype(dtype: str) -> torch.dtype:
    """`--dtype` as a torch dtype ("auto": `cpu.default_dtype()`); bfloat16 needs oneDNN's packed bf16 linear."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} must be one of {DTYPES}")
    name = cpu.default_dtype() if dtype == "auto" else dtype
    if name == "bfloat16" and not packed_linear.available(torch.bfloat16):
        raise ValueError("dtype='bfloat16': this torch build has no oneDNN packed bfloat16 linear; use float32")
    return getattr(torch, name)


class Engine:
    def __init__(self, model, tokenizer, max_batch: int = 16, max_queue: int = 64, threads: int | None = None,
                 decode_path: str = "static", quantize: str | None = None, dtype: str = "auto",
                 compile: bool = False):
        """model: float32 (its linears become `dtype` or int8 here); dtype: "auto" (bfloat16 where the CPU has
        bf16 dot products, else float32), "float32" or "bfloat16"; ignored for layers `quantize` makes int8. Under
        bfloat16 the LM head is int8 with its leading logits recomputed in float32 (`quantize.quantize_head`).
        compile: the static step's layers through torch.compile (compiled.py), compiled during the warm-up."""
        if decode_path not in DECODE_PATHS:
            raise ValueError(f"decode_path={decode_path!r} must be one of {DECODE_PATHS}")
        if compile and decode_path != "static":
            raise ValueError(f"compile=True compiles the static decode path, not decode_path={decode_path!r}")
        if quantize not in QUANTIZE:
            raise ValueError(f"quantize={quantize!r} must be one of {QUANTIZE}")
        if model.dtype != torch.float32:
            raise ValueError(f"model dtype={model.dtype}: load the model in float32; `dtype` converts its linears")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_model_len = int(getattr(model.config, "max_position_embeddings", 2048))
        self.eos_ids = _eos_ids(model, tokenizer)
        # Every core by default, each step on every core or on one, whichever runs faster now (threads.py). Only
        # the engine's own thread runs torch on several cores (it sets its count when it starts; see `start`).
        self.threads = threads or cpu.cores()
        self.thread_chooser = ThreadChooser([1, self.threads]) if threads is None and self.threads > 1 else None
        self.dtype = resolve_dtype(dtype)
        self.quantize = quantize
        self.int8_tables = {}
        if quantize == "int8":
            done, skipped = quantize_linears(self.model, keep_float=True)  # float stays where it is faster
            log.info("int8: %d linear layers quantised (kernels that run here: %s; each keeps its float32 weight "
                     "until the warm-up has timed it beside them)%s", done,
                     ", ".join(int8_kernels()),
                     f", {len(skipped)} kept in float32 ({', '.join(skipped[:3])}...)" if skipped else "")
        elif self.dtype == torch.bfloat16 and quantize_head(self.model) is not None:
            # Half a bfloat16 head's bytes (the step's largest read), and an argmax that is float32's (quantize.py).
            log.info("bfloat16: the LM head is int8 (half the bytes of bfloat16), its leading logits recomputed in "
                     "float32; its kernels are measured at warm-up")
        self._step = None
        if decode_path == "static":
            try:
                t0 = time.perf_counter()
                self._step = DecodeStep(self.model, dtype=self.dtype, rows=tuple(sorted({1, max_batch})),
                                        compile=compile)
                measured = f"measured in {time.perf_counter() - t0:.2f} s" if self._step.kind_seconds else "fixed"
                log.info("static decode path: linears by shape (%s): %s", measured,
                         linear_choice.describe(self._step.kinds, self.dtype))
            except ValueError as exc:
                if compile:  # asked for the compiled static step: no quiet fallback to an uncompiled path
                    raise ValueError(f"compile=True needs the static decode path, unavailable here: {exc}") from None
                log.warning("static decode path unavailable (%s); decoding through the model's forward", exc)
        if self._step is None and self.dtype != torch.float32:
            packed_linear.pack_in_place(self.model, self.dtype, KEEP_FLOAT32)
        self.decode_path = "static" if self._step is not None else "dynamic"
        self.warmup_seconds = 0.0
        self._batch = self._new_batch()
        self._rows: list[_Row] = []
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._in_flight = 0  # sequences submitted and not yet finished (waiting + running)
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="serve-engine", daemon=True)
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.decode_steps_total = 0  # rows_total / steps_total is the mean batch size
        self.decode_rows_total = 0
        self.peak_rows = 0

    # ---- event-loop side -------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine's thread and return once it has warmed up (the int8 kernels measured, every decode
        shape run once); a warm-up failure is raised here.

        Every multi-threaded torch op of the server runs on that one thread. libgomp keeps a team of workers for
        each thread that ever ran a parallel region, and once there are more of them than cores it caps how long a
        worker spins before sleeping at 1,000 turns, whatever GOMP_SPINCOUNT says; a decode step's ~40 parallel
        regions then each wait for a sleeping worker to be woken. Measured on the 2-core EPYC (bf16 Doge-20M step,
        batch 1, 2 threads): 1.7 ms on a thread of its own, 5.2 ms once another thread had run torch on 2 threads.
        So `python -m serve` keeps every other thread at 1 torch thread (`__main__.py`, `scoring.py`)."""
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            raise self._start_error

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=30)

    @property
    def num_running(self) -> int:
        return len(self._rows)

    @property
    def num_waiting(self) -> int:
        return sum(h.choices for h in list(self._waiting))

    def submit(self, prompts: list[list[int]], params: RequestSampling, n: int = 1) -> RequestHandle:
        """Queue `n` choices for each prompt (call from the event loop). Raises `Overloaded` past the queue limit."""
        handle = RequestHandle([list(p) for p in prompts], params, n, asyncio.get_running_loop())
        if handle.choices > self.max_batch:
            raise ValueError(f"{handle.choices} choices cannot fit in one batch of max_batch={self.max_batch}")
        with self._cond:
            if self._stopping:
                raise EngineFailure("the server is shutting down")
            if self._in_flight + handle.choices > self.max_batch + self.max_queue:
                raise Overloaded(
                    f"server overloaded: {self._in_flight} sequences in flight, limit is "
                    f"max_batch={self.max_batch} + max_queue={self.max_queue}; retry later"
                )
            self._in_flight += handle.choices
            handle.unfinished = handle.choices
            self._waiting.append(handle)
            self._cond.notify()
        return handle

    # ---- worker side ------------------------------------------------------------------------------------------

    def _new_batch(self) -> KVBatch | SlotBatch:
        if self._step is None:
            return KVBatch(self.model)
        return SlotBatch(self._step, self.max_batch, self.max_model_len)

    def _warmup(self) -> None:
        """A prefill and decode steps at batch 1 and at `max_batch`, so no request pays for lazy initialisation
        (allocator, oneDNN/MKL kernels chosen per shape). Runs before the server answers /health."""
        t0 = time.perf_counter()
        compiling = self._step is not None and self._step.compiled_layers is not None
        log.info("warming up the %s decode path (max_batch=%d%s%s)...", self.decode_path, self.max_batch,
                 ", int8" if self.quantize else "",
                 ", compiling its layers with torch.compile: 1.5-2 minutes on 2 cores, less once inductor's caches "
                 "hold them" if compiling else "")
        layers = [m for m in self.model.modules() if isinstance(m, Int8Linear)]  # --quantize int8, or a bf16 head
        other_bytes = 0  # the step's other weights, read between samples as a step reads them between two calls
        if self._step is not None:
            layers += self._step.fused_layers(Int8Linear)
            other_bytes = self._step.float_weight_bytes()
        if layers:  # measured on this thread, at the count its steps run with
            t1 = time.perf_counter()
            self.int8_tables = kernel_choice.choose(layers, self.max_batch, other_bytes=other_bytes)
            log.info("int8 kernels by rows, measured in %.2f s: %s", time.perf_counter() - t1,
                     kernel_choice.describe(self.int8_tables))
        token = self.eos_ids[0] if self.eos_ids else 0
        for threads in self.thread_chooser.counts if self.thread_chooser else [self.threads]:
            torch.set_num_threads(threads)  # oneDNN builds its kernels per thread count too
            for rows in sorted({1, self.max_batch}):
                prefill, logits = KVBatch(self.model).prefill([[token] * 2])
                prefill.repeat_rows([rows])
                batch = self._new_batch()
                batch.merge(prefill)
                for _ in range(2):
                    batch.decode([int(logits[0].argmax())] * rows)
        torch.set_num_threads(self.threads)
        if self.thread_chooser is not None:
            self.thread_chooser.current = self.threads
        self.warmup_seconds = time.perf_counter() - t0
        cache = f", KV cache {self._batch.cache.nbytes / 2**20:.1f} MiB to start" if self._step is not None else ""
        log.info("warm-up done in %.2f s (%s decode path%s)", self.warmup_seconds, self.decode_path, cache)

    def _run(self) -> None:
        try:
            torch.set_num_threads(self.threads)
            self._warmup()
        except BaseException as exc:  # start() raises it in the caller
            self._start_error = exc
            return
        finally:
            self._ready.set()
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._rows:
                    self._cond.wait()
                if self._stopping:
                    break
                admitted = self._admit()
            try:
                if admitted:
                    self._prefill(admitted)
                self._drop_cancelled()
                if self._rows:
                    self._decode_step()
            except Exception as exc:  # the model failed: fail every live request, keep serving new ones
                log.exception("generation step failed")
                self._fail_all(admitted, f"generation failed: {type(exc).__name__}: {exc}")
        self._fail_all([], "the server is shutting down")
        with self._cond:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for handle in waiting:
            self._push(handle, EngineFailure("the server is shutting down"))

    def _admit(self) -> list[RequestHandle]:
        """Pop waiting requests (FIFO) while their choices fit in the batch. Caller holds the lock."""
        admitted, free = [], self.max_batch - len(self._rows)
        while self._waiting and self._waiting[0].choices <= free:
            handle = self._waiting.popleft()
            if handle.cancelled:
                self._in_flight -= handle.unfinished
                handle.unfinished = 0
                continue
            free -= handle.choices
            admitted.append(handle)
        return admitted

    def _prefill(self, admitted: list[RequestHandle]) -> None:
        batch, logits = KVBatch(self.model).prefill([p for h in admitted for p in h.prompts])
        counts = [h.n for h in admitted for _ in h.prompts]
        batch.repeat_rows(counts)  # n choices share one prefill
        logits = logits.repeat_interleave(torch.tensor(counts), dim=0)  # [B, V]
        rows = []
        for handle in admitted:
            self.prompt_tokens_total += handle.prompt_tokens
            for index in range(handle.choices):
                prompt = handle.prompts[index // handle.n]
                rows.append(
                    _Row(
                        handle=handle,
                        index=index,
                        state=RowState(handle.params, make_generator(handle.params.seed, index), prompt),
                        detokenizer=IncrementalDetokenizer(self.tokenizer, prompt),
                        stops=StopStringFilter(list(handle.params.stop)),
                    )
                )
        self._emit(rows, logits)
        keep = [i for i, row in enumerate(rows) if not row.finished]
        batch.select(keep)
        self._batch.merge(batch)
        self._rows.extend(rows[i] for i in keep)

    def _drop_cancelled(self) -> None:
        keep = [i for i, row in enumerate(self._rows) if not row.handle.cancelled]
        if len(keep) < len(self._rows):
            for row in self._rows:
                if row.handle.cancelled and not row.finished:
                    row.finished = True
                    self._release(row.handle, 1)
            self._batch.select(keep)
            self._rows = [self._rows[i] for i in keep]

    def _decode_step(self) -> None:
        rows = len(self._rows)
        if self.thread_chooser is not None:
            threads = self.thread_chooser.choose(rows)
            self.thread_chooser.apply(threads)
        t0 = time.perf_counter()
        logits = self._batch.decode([row.next_token for row in self._rows])
        if self.thread_chooser is not None:
            self.thread_chooser.record(rows, threads, time.perf_counter() - t0)
        self.decode_steps_total += 1
        self.decode_rows_total += len(self._rows)
        self.peak_rows = max(self.peak_rows, len(self._rows))
        self._emit(self._rows, logits)
        keep = [i for i, row in enumerate(self._rows) if not row.finished]
        if len(keep) < len(self._rows):
            self._batch.select(keep)
            self._rows = [self._rows[i] for i in keep]

    def _emit(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Sample a token for every row, turn it into text, and send each handle its deltas for this step."""
        with torch.inference_mode():  # the step's logits are inference tensors, written in place here
            sampled = sample(logits, [r.state for r in rows], self.eos_ids, inplace=True)
        per_handle: dict[str, tuple[RequestHandle, list[ChoiceDelta]]] = {}
        for row, token, lp in zip(rows, sampled.token_ids, sampled.logprobs):
            row.state.output_ids.append(token)
            row.next_token = token
            row.handle.completion_tokens += 1
            self.generation_tokens_total += 1
            finish = None
            if token in self.eos_ids and not row.state.params.ignore_eos:
                text, finish = row.detokenizer.flush(), "stop"
            else:
                text = row.detokenizer.add(token)
                total = len(row.state.prompt_ids) + len(row.state.output_ids)
                if len(row.state.output_ids) >= row.state.params.max_tokens or total >= self.max_model_len:
                    text, finish = text + row.detokenizer.flush(), "length"
            released, stopped = row.stops.push(text)
            if stopped:
                finish = "stop"
            elif finish:
                released += row.stops.flush()
            logprobs = [self._token_logprob(token, lp)] if lp is not None else []
            if finish:
                row.finished = True
                self._release(row.handle, 1)
            per_handle.setdefault(row.handle.id, (row.handle, []))[1].append(
                ChoiceDelta(row.index, released, logprobs, finish)
            )
        self._push_all([(handle, deltas) for handle, deltas in per_handle.values() if not handle.cancelled])

    def _token_logprob(self, token: int, lp: tuple[float, list[tuple[int, float]]]) -> TokenLogprob:
        chosen, alternatives = lp
        return TokenLogprob(token, self._piece(token), chosen, [(i, self._piece(i), v) for i, v in alternatives])

    def _piece(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _release(self, handle: RequestHandle, sequences: int) -> None:
        with self._cond:
            handle.unfinished -= sequences
            self._in_flight -= sequences

    def _push(self, handle: RequestHandle, item) -> None:
        self._push_all([(handle, item)])

    @staticmethod
    def _push_all(items: list[tuple[RequestHandle, object]]) -> None:
        """Hand each handle its item on the handle's event loop: one wake-up per loop, not per handle (each
        `call_soon_threadsafe` writes the loop's self-pipe, and the woken loop takes the GIL from this thread)."""
        by_loop: dict[int, tuple[asyncio.AbstractEventLoop, list]] = {}
        for handle, item in items:
            by_loop.setdefault(id(handle.loop), (handle.loop, []))[1].append((handle.queue, item))
        for loop, puts in by_loop.values():
            try:
                loop.call_soon_threadsafe(_deliver, puts)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass

    def _fail_all(self, admitted: list[RequestHandle], message: str) -> None:
        handles = {h.id: h for h in admitted}
        handles.update({row.handle.id: row.handle for row in self._rows})
        for handle in handles.values():
            if handle.unfinished:
                self._release(handle, handle.unfinished)
                self._push(handle, EngineFailure(message))
        self._rows, self._batch = [], self._new_batch()


def _deliver(puts: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in puts:
        queue.put_nowait(item)


def _eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends a reply: the generation config's, the model config's and the tokenizer's."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is None:
            continue
        ids.update(value if isinstance(value, (list, tuple)) else [value])
    return sorted(int(i) for i in ids)

