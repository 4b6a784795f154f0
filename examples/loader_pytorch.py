import argparse

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

import candle_ckpt

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=5)
candle_ckpt.ckpt_parser(parser)  # adds the --ckpt_* flags
parser.set_defaults(ckpt_directory="save_loader_pytorch", ckpt_save_steps=4)
params = vars(parser.parse_args())  # or CANDLE's gParameters

torch.manual_seed(2026)  # the same data, weights and Dropout
torch.use_deterministic_algorithms(True)  # the same kernels: bit for bit
x = torch.randn(512, 8)
y = torch.sin(x).sum(dim=1, keepdim=True)
loader = StatefulDataLoader(  # its position is saved with every checkpoint
    torch.utils.data.TensorDataset(x[:384], y[:384]),
    batch_size=32,
    shuffle=True,
    generator=torch.Generator().manual_seed(2026),
)
net = torch.nn.Sequential(
    torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(32, 1)
)
opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

ckpt = candle_ckpt.CandleCkptPyTorch(params)
ckpt.set_model({"model": net, "optimizer": opt, "scheduler": sched, "loader": loader})
J = ckpt.restart(net)  # None, or J["epoch"] epochs done and J["batch"] batches of the next
first_epoch, first_batch = (J["epoch"], J["batch"]) if J else (0, 0)
for epoch in range(first_epoch, params["epochs"]):
    net.train()
    # the loader skips the batches trained already; count on from there
    for batch, (xb, yb) in enumerate(loader, start=first_batch if epoch == first_epoch else 0):
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(xb), yb).backward()
        opt.step()
        ckpt.batch_end(batch)  # saves every ckpt_save_steps batches; ckpt_signal stops here
    sched.step()
    net.eval()
    with torch.no_grad():
        val_loss = torch.nn.functional.mse_loss(net(x[384:]), y[384:]).item()
    print(f"epoch {epoch + 1}: val_loss {val_loss:.6f}")
    ckpt.ckpt_epoch(epoch, {"val_loss": val_loss})  # 0-based epoch; the last finishes
