"""How QAT's learning rates were chosen, without looking at test text: QAT W3 g64 of the first N
decoder layers of the default model, trained on 32 calibration sequences and scored on 8 others
(WikiText-2 validation) by the KL of the truncated model's logits to the float truncated model's.

    python bench/qat_lr.py 4 1e-5,1e-4,32 1e-4,1e-4,32 3e-5,3e-4,32    # layers, then lr,scale_lr,steps ...

Measured 2026-11-24 (AMD EPYC, 2 cores): AWQ start KL 0.1700; lr 1e-5 / 1e-4: 0.1490;
lr 1e-4 / 1e-4: 0.1072; lr 3e-5 / 3e-4: 0.1331 (32 steps per layer) -- hence the defaults.
"""
import copy
import os
import sys
import time

sys.path.insert(0, os.getcwd())
os.environ.setdefault("LOWBIT_DATA_DIR", "/work/shared/data")
import torch
import torch.nn.functional as F

from lowbit.calibration_data import calib_samples
from lowbit.data import calib_text
from lowbit.methods import QATConfig, quantize_
from lowbit.methods.awq import AWQConfig
from lowbit.models import load_model
from lowbit.quantizer import QuantSpec

torch.set_num_threads(2)
n_layers = int(sys.argv[1])
configs = [tuple(map(float, c.split(","))) for c in sys.argv[2:]]
model, tok = load_model("smollm2-135m")
model.model.layers = model.model.layers[:n_layers]
model.config.num_hidden_layers = n_layers
samples = calib_samples(tok, calib_text(), 40, 512)
calib, held = samples[:32], samples[32:]
spec = QuantSpec(bits=3, group_size=64)
base = copy.deepcopy(model)
with torch.no_grad():
    ref = F.log_softmax(base(held).logits.float(), -1)
def kl(m):
    with torch.no_grad():
        logp = F.log_softmax(m(held).logits.float(), -1).flatten(0, 1)
        return float(F.kl_div(logp, ref.flatten(0, 1), log_target=True, reduction="batchmean"))
m = copy.deepcopy(base)
quantize_(m, AWQConfig(spec), calib)
print(f"AWQ start: KL {kl(m):.4f}", flush=True)
for lr, slr, steps in configs:
    m = copy.deepcopy(base)
    t = time.time()
    rep = quantize_(m, QATConfig(spec, steps=int(steps), lr=lr, scale_lr=slr, awq=AWQConfig(spec)), calib)
    print(f"lr {lr:g} slr {slr:g} steps {int(steps)}: KL {kl(m):.4f}  "
          f"loss first {rep.info['first_loss']:.4g} last {rep.info['last_loss']:.4g} "
          f"({time.time()-t:.0f}s)", flush=True)
