"""How strong is train.py's I2V condition noise (App. A) next to the release's? A measurement script,
not a test.

The released I2V training adds noise of level sigma (log sigma ~ N(-3, 0.5)) to the first frame's
PIXELS, then encodes it. train.py adds the same sigma to the scaled image LATENT instead (so the
latent cache works). This script encodes real first frames with a trained VAE, once clean and once
with the release's pixel noise, and reports the latent change that pixel noise causes, as an RMS per
latent element, next to ours (sigma exactly: the noise is added to latents of about unit std). The
ratio ours / release says how much stronger our condition noise is at the same sigma.

Run (the shapes demo's VAE, or any CausalVAE.save folder, and frames from any manifest):
  python tests/i2v_noise.py --vae out/shapes/vae/vae --data out/shapes/data/manifest.jsonl
"""
import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import vae  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vae", required=True, help="a CausalVAE.save folder (a trained VAE)")
    p.add_argument("--data", required=True, help="manifest .jsonl or folder; first frames are used")
    p.add_argument("--n", type=int, default=64, help="frames to encode")
    p.add_argument("--size", default="32x32", help="HxW the frames are cropped to")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    H, W = (int(v) for v in a.size.split("x"))
    ae = vae.CausalVAE.load(a.vae).eval()
    sf = ae.cfg.scaling_factor
    frames = []
    for e in data.read_manifest(a.data)[:a.n]:
        try:
            frames.append(data.load_video(e["path"], 1, H, W))  # (3, 1, H, W)
        except data.BadVideo:
            continue
    x = torch.stack(frames)  # (N, 3, 1, H, W)
    g = torch.Generator().manual_seed(a.seed)
    with torch.no_grad():
        post = ae.encode(x)
        z = post.mean * sf  # (N, C, 1, h, w) the scaled latents the DiT sees
        std_post = float(((0.5 * post.logvar).exp() * sf).pow(2).mean().sqrt())
        print(f"{len(x)} frames {H}x{W} | scaled latents: rms {float(z.pow(2).mean().sqrt()):.3f}, "
              f"posterior std (rms) {std_post:.4f}")
        print(f"{'sigma':>8} {'release: latent rms change':>27} {'ours (= sigma)':>15} "
              f"{'ours / release':>15}")
        ratios = []
        for ls in (-4.0, -3.5, -3.0, -2.5, -2.0):
            s = math.exp(ls)
            noisy = x + s * torch.randn(x.shape, generator=g)  # the release: noise on the pixels
            d = float((ae.encode(noisy).mean * sf - z).pow(2).mean().sqrt())
            ratios.append(s / d)
            print(f"{s:8.4f} {d:27.5f} {s:15.4f} {s / d:15.1f}")
        # over the released distribution of sigma: E[sigma] / E[latent change]
        ls = torch.randn(64, generator=g) * 0.5 - 3.0
        ours, rel = 0.0, 0.0
        for s in ls.exp().tolist():
            i = torch.randint(len(x), (1,), generator=g)
            noisy = x[i] + s * torch.randn(x[i].shape, generator=g)
            rel += float((ae.encode(noisy).mean * sf - z[i]).pow(2).mean().sqrt())
            ours += s
    print(f"over log sigma ~ N(-3, 0.5): ours / release = {ours / rel:.1f}x "
          f"(median sigma {math.exp(-3):.4f})")


if __name__ == "__main__":
    main()
