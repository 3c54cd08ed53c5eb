"""The fusion VAE (F-VAE): ICM-LoRA's conditional 1-D convolutional VAE over flat LoRA vectors (spec 2.4).

Encoder: 12 x [Conv1d(k=7, s=2, p=3) -> BatchNorm1d -> LeakyReLU] -> Linear -> h; [h; v] -> mu, log sigma^2.
Decoder: [z; v] -> Linear -> 8 x L_last -> 11 x [ConvTranspose1d -> BatchNorm1d -> ELU]
         -> ConvTranspose1d(8, 8) -> BatchNorm1d -> ELU -> Conv1d(8, 1, k=7, p=3).
The task vector v enters after the encoder's conv trunk and at the decoder input (ICM-LoRA's placement).
"""

from __future__ import annotations

import torch
from torch import nn

from loracl.errors import LoraclError

ENCODER_CHANNELS = (1, 8, 16, 32, 64, 128, 256, 256, 128, 64, 32, 16, 8)
DECODER_CHANNELS = (8, 16, 32, 64, 128, 256, 256, 128, 64, 32, 16, 8)
DOWNSAMPLE = 2 ** (len(ENCODER_CHANNELS) - 1)  # 4096
LOGVAR_CLAMP = 10.0  # [X] AiDotNet's clamp; keeps exp(logvar) finite early in training


class FusionVAE(nn.Module):
    """q(z | l, v) and p(l | z, v) for flat LoRA vectors l of length `length` (a multiple of 4096)."""

    def __init__(self, length: int, condition_dim: int, latent_dim: int = 256, channel_divisor: int = 1) -> None:
        super().__init__()
        if length % DOWNSAMPLE:
            raise LoraclError(f"F-VAE input length {length} must be a multiple of {DOWNSAMPLE}")
        self.length, self.condition_dim, self.latent_dim = length, condition_dim, latent_dim
        self.last_length = length // DOWNSAMPLE
        # channel_divisor > 1 thins every conv layer (ours, for CPU budgets); 1 is ICM-LoRA's exact trunk
        encoder_channels = [1] + [max(1, c // channel_divisor) for c in ENCODER_CHANNELS[1:]]
        decoder_channels = [max(1, c // channel_divisor) for c in DECODER_CHANNELS]
        self.start_channels = decoder_channels[0]
        blocks = []
        for c_in, c_out in zip(encoder_channels[:-1], encoder_channels[1:]):
            blocks += [nn.Conv1d(c_in, c_out, 7, stride=2, padding=3), nn.BatchNorm1d(c_out), nn.LeakyReLU()]
        self.encoder = nn.Sequential(*blocks)
        width = encoder_channels[-1] * self.last_length
        self.to_hidden = nn.Linear(width, latent_dim)
        self.to_mean = nn.Linear(latent_dim + condition_dim, latent_dim)
        self.to_logvar = nn.Linear(latent_dim + condition_dim, latent_dim)
        self.from_latent = nn.Linear(latent_dim + condition_dim, width)
        blocks = []
        for c_in, c_out in zip(decoder_channels[:-1], decoder_channels[1:]):
            blocks += [nn.ConvTranspose1d(c_in, c_out, 7, stride=2, padding=3, output_padding=1), nn.BatchNorm1d(c_out), nn.ELU()]
        last = decoder_channels[-1]
        blocks += [
            nn.ConvTranspose1d(last, last, 7, stride=2, padding=3, output_padding=1),
            nn.BatchNorm1d(last),
            nn.ELU(),
            nn.Conv1d(last, 1, 7, padding=3),
        ]
        self.decoder = nn.Sequential(*blocks)

    def encode(self, flat: torch.Tensor, condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. (4): flat [B, N_pad], condition [B, d_v] -> mu, log sigma^2 [B, d_z]."""
        trunk = self.encoder(flat.unsqueeze(1))  # [B, 8, L_last]
        hidden = torch.cat([self.to_hidden(trunk.flatten(1)), condition], dim=1)
        return self.to_mean(hidden), self.to_logvar(hidden).clamp(-LOGVAR_CLAMP, LOGVAR_CLAMP)

    def decode(self, latent: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Eq. (5): z [B, d_z], v [B, d_v] -> flat [B, N_pad]."""
        start = self.from_latent(torch.cat([latent, condition], dim=1))
        return self.decoder(start.view(-1, self.start_channels, self.last_length)).squeeze(1)

    @staticmethod
    def sample(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        return mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)

    def forward(self, flat: torch.Tensor, condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean, logvar = self.encode(flat, condition)
        return self.decode(self.sample(mean, logvar), condition), mean, logvar


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Eq. (11b): KL(N(mu, sigma^2) || N(0, I)) summed over latent dims, averaged over the batch [C]."""
    return (-0.5 * (1 + logvar - mean.pow(2) - logvar.exp()).sum(dim=1)).mean()


def cvae_loss(target: torch.Tensor, reconstruction: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor, kl_weight: float) -> torch.Tensor:
    """Eq. (11a) + lambda_KL * (11b): MSE over all padded positions plus the weighted KL [C]."""
    return torch.nn.functional.mse_loss(reconstruction, target) + kl_weight * kl_divergence(mean, logvar)
