"""Tacotron2 (Shen et al., 2018) with a reduction factor r >= 1.

The shape follows the paper and NVIDIA/tacotron2: a convolutional + BiLSTM encoder,
location-sensitive attention, an autoregressive LSTM decoder fed through a prenet whose
dropout stays on at inference (the paper's source of output variation, and what keeps the
decoder from copying its own input), a stop gate, and a convolutional postnet.

Differences that matter for training on small data and on CPU:
- r frames are predicted per decoder step (``n_frames_per_step``); the prenet is fed the
  last frame of the previous group, the gate predicts one stop logit per frame;
- every padded position is masked: encoder outputs are packed, attention never looks at
  padded tokens, and padded frames are zeroed before the postnet so that teacher-forced
  training and free-running inference see the same postnet inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from services.trainer.config import ModelConfig


def length_mask(lengths: Tensor, max_len: int | None = None) -> Tensor:
    """Boolean mask [batch, max_len], True on valid positions."""
    max_len = int(lengths.max()) if max_len is None else max_len
    positions = torch.arange(max_len, device=lengths.device)
    return positions.unsqueeze(0) < lengths.unsqueeze(1)


class LinearNorm(nn.Linear):
    """Linear layer with Xavier initialisation for the activation that follows it."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True, gain: str = "linear"):
        super().__init__(in_dim, out_dim, bias=bias)
        nn.init.xavier_uniform_(self.weight, gain=nn.init.calculate_gain(gain))


class ConvNorm(nn.Conv1d):
    """1-D convolution with 'same' padding and Xavier initialisation."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 1, bias: bool = True,
                 gain: str = "linear"):
        if kernel_size % 2 != 1:
            raise ValueError("kernel_size must be odd for 'same' padding")
        super().__init__(in_ch, out_ch, kernel_size, padding=(kernel_size - 1) // 2, bias=bias)
        nn.init.xavier_uniform_(self.weight, gain=nn.init.calculate_gain(gain))


class Encoder(nn.Module):
    """Character embeddings -> 3 conv blocks -> bidirectional LSTM."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dim = cfg.encoder_embedding_dim
        self.convolutions = nn.ModuleList(
            nn.Sequential(ConvNorm(dim, dim, cfg.encoder_kernel_size, gain="relu"),
                          nn.BatchNorm1d(dim))
            for _ in range(cfg.encoder_n_convolutions)
        )
        self.lstm = nn.LSTM(dim, dim // 2, num_layers=1, batch_first=True, bidirectional=True)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        """x: [B, dim, N] embedded text; returns [B, N, dim]."""
        mask = length_mask(lengths, x.size(2)).unsqueeze(1)
        for conv in self.convolutions:
            # Zero padding between layers so that padded tokens never leak into valid ones.
            x = F.dropout(F.relu(conv(x * mask)), 0.5, self.training)
        packed = pack_padded_sequence(x.transpose(1, 2), lengths.cpu(), batch_first=True,
                                      enforce_sorted=False)
        outputs, _ = self.lstm(packed)
        outputs, _ = pad_packed_sequence(outputs, batch_first=True, total_length=x.size(2))
        return outputs


class Prenet(nn.Module):
    """Two ReLU layers with dropout that is on in training *and* inference (paper, sec. 2.2)."""

    def __init__(self, in_dim: int, dim: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList([LinearNorm(in_dim, dim, bias=False),
                                     LinearNorm(dim, dim, bias=False)])
        self.dropout = dropout

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Apply both layers; dropout ignores ``self.training`` on purpose.

        ``generator`` draws the dropout masks instead of torch's global generator: inference
        beside a training run (the probes' thread) must neither reseed nor consume the
        stream the training steps draw from, or training stops being reproducible.
        """
        for layer in self.layers:
            x = F.relu(layer(x))
            if generator is None:
                x = F.dropout(x, p=self.dropout, training=True)
            elif self.dropout > 0:
                keep = torch.empty_like(x).bernoulli_(1 - self.dropout, generator=generator)
                x = x * keep / (1 - self.dropout)
        return x


class LocationSensitiveAttention(nn.Module):
    """Additive attention with location features from previous and cumulative weights."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.query_layer = LinearNorm(cfg.attention_rnn_dim, cfg.attention_dim, bias=False,
                                      gain="tanh")
        self.memory_layer = LinearNorm(cfg.encoder_embedding_dim, cfg.attention_dim,
                                       bias=False, gain="tanh")
        self.v = LinearNorm(cfg.attention_dim, 1, bias=False)
        self.location_conv = ConvNorm(2, cfg.attention_location_n_filters,
                                      cfg.attention_location_kernel_size, bias=False)
        self.location_dense = LinearNorm(cfg.attention_location_n_filters, cfg.attention_dim,
                                         bias=False, gain="tanh")

    def process_memory(self, memory: Tensor) -> Tensor:
        """Project the encoder outputs once per utterance rather than once per step."""
        return self.memory_layer(memory)

    def forward(self, query: Tensor, memory: Tensor, processed_memory: Tensor,
                weights_cat: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Return (context [B, enc_dim], weights [B, N]); padded tokens get zero weight."""
        location = self.location_dense(self.location_conv(weights_cat).transpose(1, 2))
        energies = self.v(torch.tanh(
            self.query_layer(query).unsqueeze(1) + location + processed_memory)).squeeze(2)
        energies = energies.masked_fill(~mask, float("-inf"))
        weights = F.softmax(energies, dim=1)
        context = torch.bmm(weights.unsqueeze(1), memory).squeeze(1)
        return context, weights


@dataclass
class DecoderState:
    """Recurrent state carried between decoder steps."""

    attention_hidden: Tensor
    attention_cell: Tensor
    decoder_hidden: Tensor
    decoder_cell: Tensor
    weights: Tensor
    weights_cum: Tensor
    context: Tensor


class Decoder(nn.Module):
    """Autoregressive decoder producing r frames and r stop logits per step."""

    def __init__(self, cfg: ModelConfig, n_mels: int):
        super().__init__()
        self.cfg = cfg
        self.n_mels = n_mels
        self.r = cfg.n_frames_per_step
        enc = cfg.encoder_embedding_dim
        self.prenet = Prenet(n_mels, cfg.prenet_dim, cfg.prenet_dropout)
        self.attention_rnn = nn.LSTMCell(cfg.prenet_dim + enc, cfg.attention_rnn_dim)
        self.attention = LocationSensitiveAttention(cfg)
        self.decoder_rnn = nn.LSTMCell(cfg.attention_rnn_dim + enc, cfg.decoder_rnn_dim)
        self.projection = LinearNorm(cfg.decoder_rnn_dim + enc, n_mels * self.r)
        self.gate = LinearNorm(cfg.decoder_rnn_dim + enc, self.r, gain="sigmoid")

    def initial_state(self, memory: Tensor) -> DecoderState:
        """All-zero state for a batch of encoder outputs [B, N, enc]."""
        batch, n_tokens, enc = memory.shape

        def zeros(*shape: int) -> Tensor:
            return memory.new_zeros(*shape)

        return DecoderState(
            attention_hidden=zeros(batch, self.cfg.attention_rnn_dim),
            attention_cell=zeros(batch, self.cfg.attention_rnn_dim),
            decoder_hidden=zeros(batch, self.cfg.decoder_rnn_dim),
            decoder_cell=zeros(batch, self.cfg.decoder_rnn_dim),
            weights=zeros(batch, n_tokens),
            weights_cum=zeros(batch, n_tokens),
            context=zeros(batch, enc),
        )

    def step(self, prenet_out: Tensor, state: DecoderState, memory: Tensor,
             processed_memory: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, DecoderState]:
        """One decoder step: returns (frames [B, r*n_mels], gate logits [B, r], new state)."""
        cell_input = torch.cat((prenet_out, state.context), dim=-1)
        att_h, att_c = self.attention_rnn(cell_input, (state.attention_hidden,
                                                       state.attention_cell))
        att_h = F.dropout(att_h, self.cfg.p_attention_dropout, self.training)
        weights_cat = torch.stack((state.weights, state.weights_cum), dim=1)
        context, weights = self.attention(att_h, memory, processed_memory, weights_cat, mask)
        dec_h, dec_c = self.decoder_rnn(torch.cat((att_h, context), dim=-1),
                                        (state.decoder_hidden, state.decoder_cell))
        dec_h = F.dropout(dec_h, self.cfg.p_decoder_dropout, self.training)
        hidden_context = torch.cat((dec_h, context), dim=1)
        new_state = DecoderState(att_h, att_c, dec_h, dec_c, weights,
                                 state.weights_cum + weights, context)
        return self.projection(hidden_context), self.gate(hidden_context), new_state

    def forward(self, memory: Tensor, mels: Tensor, input_lengths: Tensor
                ) -> tuple[Tensor, Tensor, Tensor]:
        """Teacher-forced decoding.

        mels: [B, n_mels, T] with T a multiple of r. Returns mel [B, n_mels, T],
        gate logits [B, T] and alignments [B, T // r, N].
        """
        batch, n_mels, frames = mels.shape
        if frames % self.r:
            raise ValueError(f"mel length {frames} is not a multiple of r={self.r}")
        steps = frames // self.r
        # Step k is fed the last frame of group k-1; step 0 gets an all-zero "go" frame.
        last_frames = mels.view(batch, n_mels, steps, self.r)[:, :, :, -1].permute(2, 0, 1)
        inputs = torch.cat((mels.new_zeros(1, batch, n_mels), last_frames[:-1]), dim=0)
        prenet_out = self.prenet(inputs)
        processed = self.attention.process_memory(memory)
        mask = length_mask(input_lengths, memory.size(1))
        state = self.initial_state(memory)
        outputs, gates, alignments = [], [], []
        for k in range(steps):
            frame, gate, state = self.step(prenet_out[k], state, memory, processed, mask)
            outputs.append(frame)
            gates.append(gate)
            alignments.append(state.weights)
        mel_out = torch.stack(outputs, dim=1).view(batch, steps, self.r, n_mels)
        mel_out = mel_out.reshape(batch, frames, n_mels).transpose(1, 2)
        gate_out = torch.stack(gates, dim=1).reshape(batch, frames)
        return mel_out, gate_out, torch.stack(alignments, dim=1)

    @torch.no_grad()
    def infer(self, memory: Tensor, input_lengths: Tensor, max_steps: int,
              generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Free-running decoding until every item's gate fires or ``max_steps``; the
        prenet's dropout draws from ``generator`` when given.

        Returns mel [B, n_mels, T], gate logits [B, T], alignments [B, steps, N] and the
        number of frames before each item's stop frame (inclusive) as output lengths.
        """
        batch = memory.size(0)
        processed = self.attention.process_memory(memory)
        mask = length_mask(input_lengths, memory.size(1))
        state = self.initial_state(memory)
        frame_in = memory.new_zeros(batch, self.n_mels)
        lengths = torch.full((batch,), -1, dtype=torch.long, device=memory.device)
        outputs, gates, alignments = [], [], []
        for k in range(max_steps):
            frames, gate, state = self.step(self.prenet(frame_in, generator), state, memory,
                                            processed, mask)
            outputs.append(frames)
            gates.append(gate)
            alignments.append(state.weights)
            frame_in = frames.view(batch, self.r, self.n_mels)[:, -1]
            fired = torch.sigmoid(gate) > self.cfg.gate_threshold
            for b in range(batch):
                if lengths[b] < 0 and bool(fired[b].any()):
                    first = int(fired[b].nonzero()[0])
                    lengths[b] = k * self.r + first + 1
            if bool((lengths >= 0).all()):
                break
        steps = len(outputs)
        lengths[lengths < 0] = steps * self.r
        mel_out = torch.stack(outputs, dim=1).view(batch, steps * self.r, self.n_mels)
        gate_out = torch.stack(gates, dim=1).reshape(batch, steps * self.r)
        return mel_out.transpose(1, 2), gate_out, torch.stack(alignments, dim=1), lengths


class Postnet(nn.Module):
    """Five 1-D conv layers predicting a residual that refines the decoder's mel."""

    def __init__(self, cfg: ModelConfig, n_mels: int):
        super().__init__()
        dims = [n_mels] + [cfg.postnet_embedding_dim] * (cfg.postnet_n_convolutions - 1)
        dims.append(n_mels)
        layers = []
        for i in range(cfg.postnet_n_convolutions):
            last = i == cfg.postnet_n_convolutions - 1
            layers.append(nn.Sequential(
                ConvNorm(dims[i], dims[i + 1], cfg.postnet_kernel_size,
                         gain="linear" if last else "tanh"),
                nn.BatchNorm1d(dims[i + 1])))
        self.layers = nn.ModuleList(layers)
        # Zero-initialised last BatchNorm scale: the postnet starts as the identity instead
        # of adding unit-variance noise to a normalised mel, which otherwise dominates the
        # loss for the first few hundred steps (Goyal et al., 2017, for residual branches).
        nn.init.zeros_(layers[-1][1].weight)

    def forward(self, x: Tensor, frame_mask: Tensor) -> Tensor:
        """x: [B, n_mels, T] -> residual of the same shape.

        ``frame_mask`` [B, 1, T] zeroes padding before every layer, so that valid frames
        near the end see the same zeros a lone utterance sees at inference.
        """
        for i, layer in enumerate(self.layers):
            x = layer(x * frame_mask)
            if i < len(self.layers) - 1:
                x = torch.tanh(x)
            x = F.dropout(x, 0.5, self.training)
        return x


@dataclass
class TacotronOutput:
    """What one forward pass produces."""

    mel: Tensor
    mel_postnet: Tensor
    gate: Tensor
    alignments: Tensor
    output_lengths: Tensor


class Tacotron2(nn.Module):
    """Encoder, attention decoder and postnet."""

    def __init__(self, cfg: ModelConfig, n_mels: int):
        super().__init__()
        if cfg.n_symbols <= 0:
            raise ValueError("ModelConfig.n_symbols must be set from the text front-end")
        self.cfg = cfg
        self.n_mels = n_mels
        self.embedding = nn.Embedding(cfg.n_symbols, cfg.symbols_embedding_dim)
        std = (2.0 / (cfg.n_symbols + cfg.symbols_embedding_dim)) ** 0.5
        bound = (3.0**0.5) * std
        self.embedding.weight.data.uniform_(-bound, bound)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg, n_mels)
        self.postnet = Postnet(cfg, n_mels)

    def encode(self, text: Tensor, input_lengths: Tensor) -> Tensor:
        """Token ids [B, N] -> encoder outputs [B, N, enc]."""
        return self.encoder(self.embedding(text).transpose(1, 2), input_lengths)

    def forward(self, text: Tensor, input_lengths: Tensor, mels: Tensor,
                output_lengths: Tensor) -> TacotronOutput:
        """Teacher-forced pass used for training and validation."""
        memory = self.encode(text, input_lengths)
        mel, gate, alignments = self.decoder(memory, mels, input_lengths)
        # Padded frames are zeroed so the postnet sees what it sees at inference.
        frame_mask = length_mask(output_lengths, mel.size(2)).unsqueeze(1)
        mel = mel * frame_mask
        mel_postnet = (mel + self.postnet(mel, frame_mask)) * frame_mask
        return TacotronOutput(mel, mel_postnet, gate, alignments, output_lengths)

    @torch.no_grad()
    def infer(self, text: Tensor, input_lengths: Tensor | None = None,
              max_decoder_steps: int | None = None, generator: torch.Generator | None = None
              ) -> TacotronOutput:
        """Free-running synthesis; padded frames of shorter items are zeroed. ``generator``
        draws the prenet's dropout (default: torch's global generator)."""
        if input_lengths is None:
            input_lengths = torch.full((text.size(0),), text.size(1), dtype=torch.long,
                                       device=text.device)
        memory = self.encode(text, input_lengths)
        mel, gate, alignments, lengths = self.decoder.infer(
            memory, input_lengths, max_decoder_steps or self.cfg.max_decoder_steps, generator)
        frame_mask = length_mask(lengths, mel.size(2)).unsqueeze(1)
        mel = mel * frame_mask
        mel_postnet = (mel + self.postnet(mel, frame_mask)) * frame_mask
        return TacotronOutput(mel, mel_postnet, gate, alignments, lengths)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
