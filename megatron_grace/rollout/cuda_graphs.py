"""Row buckets for the decode step, each replayed from a CUDA graph on GPUs.

A decode step launches a few hundred small kernels (28 layers × ~15 ops, the sampler, the bookkeeping); at 80 rows
each kernel runs for microseconds, so launching them from Python costs more than running them. A CUDA graph launches
the whole step at once. A graph replays fixed tensor addresses and shapes, so the decode state of each row count
lives in static tensors: the batch's own count and every power of two below it (compaction moves the live rows into
the smallest bucket that holds them; the rows after them are padding rows: done, their results written to a scratch
row). Each bucket's graph is captured the first time it is used: one eager warm-up step (compiles the Triton kernels;
the state and results are restored after it) and the capture. Where capture fails, the step runs eagerly with a
warning that names why. Off CUDA the step runs eagerly on exactly the live rows.
"""
from __future__ import annotations

import warnings

import torch


def capture_cuda_graph(run, before_capture, pool):
    """One eager warm-up of ``run`` on a side stream (Triton compiles, the allocator settles), ``before_capture()``,
    then the capture of ``run`` into a CUDA graph (nothing runs during a capture) sharing the memory ``pool``."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    before_capture()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        run()
    return graph


class BucketGraphs:
    def __init__(self, step, *, capture, results):
        """``step(state, key_length)`` advances every row of ``state`` (a dict of [rows, ...] tensors) by one token
        in place; ``results`` holds the tensors it writes besides the state (saved around the warm-up). ``capture``:
        :func:`capture_cuda_graph`, or None to run every step eagerly on the live rows."""
        self.step = step
        self.capture = capture
        self.enabled = capture is not None
        self.results = results
        self.states: dict[int, dict[str, torch.Tensor]] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None

    def state(self, bucket: int, rows_state: dict, live_rows: int, *, filler_row: int) -> dict:
        """The state of ``bucket`` rows holding the first ``live_rows`` rows of ``rows_state``; padding rows copy the
        first row's settings, are done, and write to the results' row ``filler_row``. Eagerly: ``rows_state``."""
        if not self.enabled:
            return rows_state
        static = self.states.get(bucket)
        if static is None:
            static = {name: value.new_empty((bucket, *value.shape[1:])) for name, value in rows_state.items()}
            self.states[bucket] = static
        for name, value in rows_state.items():
            static[name][:live_rows] = value[:live_rows]
            static[name][live_rows:] = value[:1]
        static["done"][live_rows:] = True
        static["rows"][live_rows:] = filler_row
        return static

    def run(self, state: dict, key_length: int) -> None:
        """One step of ``state``'s rows: a graph replay, or eagerly (reading the cache up to ``key_length``)."""
        bucket = state["rows"].shape[0]
        if not self.enabled:
            self.step(state, key_length)
            return
        graph = self.graphs.get(bucket)
        if graph is None:
            graph = self._capture(bucket, state)
            if graph is None:
                self.step(state, None)
                return
        graph.replay()

    def _snapshot(self, state: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
        tensors = [*state.values(), *vars(self.results).values()]
        return [(tensor, tensor.clone()) for tensor in tensors]

    def _capture(self, bucket: int, state: dict):
        saved = self._snapshot(state)

        def restore():
            for tensor, copy in saved:
                tensor.copy_(copy)

        try:
            graph = self.capture(lambda: self.step(state, None), restore, self.pool)
        except Exception as error:  # noqa: BLE001 - any capture failure falls back to the same step, eagerly
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            restore()
            warnings.warn(f"the decode step runs eagerly: CUDA graph capture failed for {bucket} rows ({error})")
            self.enabled = False
            return None
        self.pool = graph.pool()
        self.graphs[bucket] = graph
        return graph
