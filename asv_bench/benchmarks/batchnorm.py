"""numbabn's stages side by side with NumPy, PyTorch and the CUDA backend.

Classes are generated from :data:`STAGES` (never hand-copied per case); each runs over the
grid layout x size x dtype x backend of ``benchmarks.PARAMS``:

- ``<Stage>.time_<stage>``: one call (device work synchronized inside the timing);
- ``<Stage>.track_<stage>_over_copy``: the stage's time over a streaming copy of the same
  array on the same backend, timed in one interleaved run (``unit = "ratio"``): a kernel
  sliding toward or away from the memory floor shows as a number that machine noise barely
  moves.  At memory speed (the bytes each stage must move over the copy's): stats 0.5,
  train 1.5, eval 1.0, backward 2.5, layer 4.0;
- ``<Stage>Memory.peakmem_<stage>``: the process's peak resident memory after one call
  (host memory only).

``setup`` checks every result against numbabn's float64 oracle before timing anything.
The peak-memory classes check a small array of the same layout, dtype and backend instead:
asv reads the process's peak RSS, which cannot be reset, so the float64 reference of the
full array would be the peak measured.
"""

from numbabn.bench.timing import interleaved

from . import PARAM_NAMES, PARAMS, make_case, prepare

#: Stage -> class name.  ``ema`` has no track (it is O(C), a copy of ``x`` is no yardstick).
STAGES = {
    "stats": "Statistics",
    "train": "TrainingForward",
    "eval": "EvalForward",
    "backward": "Backward",
    "ema": "EMAUpdate",
    "layer": "BatchNormRoundTrip",
}


class _Stage:
    """Base of the generated classes; ``stage`` names what they time."""

    stage = None
    memory = False  # the peak-memory classes: check a small array, not the measured one
    params = PARAMS
    param_names = PARAM_NAMES
    timeout = 600  # the large NumPy and float64 cases take a while to set up and check

    def setup(self, layout, size, dtype, backend):
        stages = (self.stage, "copy")
        if self.memory:
            prepare(backend, make_case(layout, "small", dtype), stages)
        self.backend, fns = prepare(backend, make_case(layout, size, dtype), stages, check=not self.memory)
        self.run, self.copy = fns[self.stage], fns["copy"]
        if self.memory:
            self._once()  # compile (or load) the kernels for this size outside the measurement

    def _once(self, *params):
        self.run()
        self.backend.synchronize()

    def _over_copy(self, *params):
        sync = self.backend.synchronize
        t = interleaved({"stage": self.run, "copy": self.copy}, budget=0.3, sync={"stage": sync, "copy": sync})
        return round(t["stage"] / t["copy"], 4)

    _over_copy.unit = "ratio"


def _make(stage, name, memory):
    if memory:
        methods = {f"peakmem_{stage}": _Stage._once}
    else:
        methods = {f"time_{stage}": _Stage._once}
        if stage != "ema":
            methods[f"track_{stage}_over_copy"] = _Stage._over_copy
    cls = type(name, (_Stage,), {"stage": stage, "memory": memory, **methods})
    cls.__doc__ = f"The ``{stage}`` stage (``numbabn.bench.cases``) over the grid."
    return cls


for _stage, _name in STAGES.items():
    globals()[_name] = _make(_stage, _name, memory=False)
    globals()[_name + "Memory"] = _make(_stage, _name + "Memory", memory=True)
