import argparse

import numpy as np

import candle_ckpt

# TensorFlow and Keras, without the start-up lines TensorFlow writes to stderr
tf, keras = candle_ckpt.import_tensorflow_quietly()

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=5)  # required by the callback
candle_ckpt.ckpt_parser(parser)  # adds the --ckpt_* flags
parser.set_defaults(ckpt_directory="save_quickstart")
params = vars(parser.parse_args())  # or CANDLE's gParameters

keras.utils.set_random_seed(2026)  # the same data, weights and Dropout
tf.config.experimental.enable_op_determinism()  # the same kernels: bit for bit
x = np.random.default_rng(2026).standard_normal((512, 8)).astype("float32")
y = np.sin(x).sum(axis=1, keepdims=True)
model = keras.Sequential(
    [
        keras.Input((8,)),
        keras.layers.Dense(32, activation="relu"),
        keras.layers.Dropout(0.1),
        keras.layers.Dense(1),
    ]
)
model.compile(optimizer="adam", loss="mse")

J = candle_ckpt.restart(params, model)  # None, or the ckpt-info.json dict
initial_epoch = J["epoch"] if J else 0
ckpt = candle_ckpt.CandleCheckpointCallback(params)
model.fit(
    x[:384],
    y[:384],
    validation_data=(x[384:], y[384:]),
    shuffle=False,
    epochs=params["epochs"],
    initial_epoch=initial_epoch,
    callbacks=[ckpt],
)
