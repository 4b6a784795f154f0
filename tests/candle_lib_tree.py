"""Trees as upstream CANDLE (candle_lib, develop: candle/ckpt_utils.py and its Keras and
PyTorch back ends) writes them, written here from a reading of that code.

What its `CandleCkpt.ckpt_epoch` leaves, for `ckpt_directory` D (None: `<output_dir>/ckpts`):

- `D/ckpt.log`, lines "<asctime> CandleCkpt: <message>";
- each saved epoch N (1-based) written to `D/work/model.h5`, then `D/work` renamed to
  `D/epochs/NNN` ("%03i");
- `model.h5`: Keras `model.save("model.h5")` (Keras 3: the legacy HDF5 full model, with
  the optimizer's variables) or PyTorch `torch.save({"epoch", "model_state_dict",
  "optimizer_state_dict", "loss": 0})`, a pickle despite the name;
- `ckpt-info.json`: 8 keys (epoch, save_best_metric, best_metric_last, model_file,
  checksum: str(CRC32) or "__DISABLED__", timestamp "%Y-%m-%d %H:%M:%S", time_elapsed:
  "__FIRST__" then seconds, metadata), `json.dump` then a newline;
- `D/best` when the metric improved (direction "-": lower is better, from +inf), then
  `D/last`, each an absolute symlink to the resolved epoch directory (removed, then made);
- save rules: interval 0 saves nothing; epoch < ckpt_skip_epochs is skipped; an
  improvement, the final epoch, or epoch % interval == 0 is saved;
- keep: newest first, the epoch just written, the best one and `ckpt_keep_limit` more
  are kept; the others are removed with `shutil.rmtree`.
"""

import datetime
import json
import logging
import math
import os
import shutil
import zlib


class UpstreamTreeWriter:
    """Save epochs as candle_lib does. `save(epoch0, metric, write_model)`: epoch0 is the
    0-based loop index; `write_model(path)` writes the model file."""

    def __init__(self, params):
        directory = params.get("ckpt_directory")
        if directory is None:
            directory = params["output_dir"] + "/ckpts"
        self.root = os.path.abspath(directory)
        self.epochs_max = params["epochs"]
        self.interval = params.get("ckpt_save_interval", 1)
        self.skip = params.get("ckpt_skip_epochs", 0)
        self.keep_limit = params.get("ckpt_keep_limit", 5)
        self.checksum = params.get("ckpt_checksum", False)
        self.metric_name = params.get("ckpt_save_best_metric", "val_loss")
        self.metadata = params.get("metadata")
        self.best_value, self.best_epoch = math.inf, 0
        self.written = []
        self.timestamp_last = None
        os.makedirs(self.root, exist_ok=True)
        self.log = logging.getLogger(f"upstream-candle-{id(self)}")
        self.log.setLevel(logging.DEBUG)
        self.log.propagate = False
        handler = logging.FileHandler(os.path.join(self.root, "ckpt.log"))
        handler.setFormatter(logging.Formatter("%(asctime)s CandleCkpt: %(message)s"))
        self.log.addHandler(handler)
        self.log.info("Callback initialized.")
        self.log.info("ckpt_directory: %s", self.root)

    def save(self, epoch0, metric, write_model):
        epoch = epoch0 + 1
        if not self._wanted(epoch, metric):
            return
        this = os.path.join(self.root, "epochs", "%03i" % epoch)
        work = os.path.join(self.root, "work")
        if os.path.exists(this):
            shutil.rmtree(this)
        os.makedirs(os.path.join(self.root, "epochs"), exist_ok=True)
        os.makedirs(work, exist_ok=True)
        model_file = os.path.join(work, "model.h5")
        write_model(model_file)
        with open(model_file, "rb") as f:
            checksum = str(zlib.crc32(f.read())) if self.checksum else "__DISABLED__"
        now = datetime.datetime.now()
        elapsed = (
            "__FIRST__"
            if self.timestamp_last is None
            else (now - self.timestamp_last).total_seconds()
        )
        self.timestamp_last = now
        info = {
            "epoch": epoch,
            "save_best_metric": self.metric_name,
            "best_metric_last": self.best_value,
            "model_file": "model.h5",
            "checksum": checksum,
            "timestamp": now.strftime("%Y-%m-%d %H:%M:%S"),
            "time_elapsed": elapsed,
            "metadata": self.metadata,
        }
        with open(os.path.join(work, "ckpt-info.json"), "w") as f:
            json.dump(info, f)
            f.write("\n")
        os.rename(work, this)
        self.written.append(epoch)
        if self.best_epoch == epoch:
            self._link(this, "best")
        self._link(this, "last")
        self._clean(epoch)
        self.log.info("saved epoch %i", epoch)

    def _wanted(self, epoch, metric):
        if self.interval == 0 or epoch < self.skip:
            return False
        if metric < self.best_value:
            self.best_value, self.best_epoch = float(metric), epoch
            return True
        return epoch == self.epochs_max or epoch % self.interval == 0

    def _link(self, target, name):
        link = os.path.join(self.root, name)
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(os.path.realpath(target), link)

    def _clean(self, now):
        kept = 0
        for epoch in reversed(list(self.written)):
            if epoch == now or epoch == self.best_epoch or kept < self.keep_limit:
                kept += 1
                continue
            shutil.rmtree(os.path.join(self.root, "epochs", "%03i" % epoch))
            self.written.remove(epoch)


def keras_upstream_callback(params):
    """A Keras callback saving as candle_lib's CandleCkptKeras does (`model.save`)."""
    import keras

    writer = UpstreamTreeWriter(params)

    class Upstream(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            metric = logs[writer.metric_name]
            writer.save(epoch, metric, self.model.save)

    return Upstream()


def torch_upstream_save(writer, epoch0, metric, model, optimizer):
    """candle_lib's CandleCkptPyTorch.ckpt_epoch: the torch pickle named model.h5."""
    import torch

    def write(path):
        torch.save(
            {
                "epoch": epoch0 + 1,
                "model_state_dict": model.state_dict(),
                "optimizer_state_dict": optimizer.state_dict(),
                "loss": 0,
            },
            path,
        )

    writer.save(epoch0, metric, write)
