"""A process's peak private memory over a block of code (tests of what an export holds)."""


class AnonymousPeak:
    """The peak of this process's private (anonymous) RSS while the block runs, sampled every
    millisecond. Memory-mapped checkpoint files are left out: their pages are the page cache's,
    which the kernel reclaims, not memory the export holds."""

    def __init__(self):
        import threading

        self.peak = self.start = self._anonymous()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def _anonymous() -> int:
        status = open("/proc/self/status").read()
        return int(status.split("RssAnon:")[1].split()[0]) * 1024

    def _sample(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._anonymous())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def grown(self) -> int:
        return self.peak - self.start


# A fresh process whose allocator returns large blocks at once: glibc's adaptive mmap threshold would
# otherwise keep them in its heap, so a measured block could reuse memory freed earlier and show none.
FIXED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024), "MALLOC_TRIM_THRESHOLD_": str(128 * 1024)}


def export_peak(checkpoint: str, model_ref: str, out_dir: str, shard_bytes: int, timeout_s: float = 300) -> int:
    """The private memory `export_hf_model` grows by while writing `checkpoint` as `out_dir`, measured
    in a fresh Python process, on its second export (the first imports what the export imports)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from pathlib import Path
import torch
from memory_peak import AnonymousPeak
from pipeline.train.checkpoints import local_checkpoint
from pipeline.train.export import export_hf_model
with local_checkpoint({checkpoint!r}) as directory:
    export_hf_model(directory, {model_ref!r}, Path({out_dir!r} + "-first"), torch.float32, {shard_bytes})
    with AnonymousPeak() as memory:
        export_hf_model(directory, {model_ref!r}, Path({out_dir!r}), torch.float32, {shard_bytes})
print(memory.grown)
"""
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, **FIXED_MALLOC}, capture_output=True,
                          text=True, timeout=timeout_s)
    assert done.returncode == 0, done.stderr[-3000:]
    return int(done.stdout.split()[-1])
