"""A short pure-PyTorch LSTM: the readable specification that the tests hold the kernels to.

Gate order i, f, g, o (nn.LSTM's). For one step, with x_t [B, I] and h_{t-1} [B, P], c_{t-1} [B, H]:
    z   = x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh          [B, 4H]
    i, f, g, o = σ(z_i), σ(z_f), tanh(z_g), σ(z_o)          each [B, H]
    c_t = f ⊙ c_{t-1} + i ⊙ g                               forget, then remember
    h_t = o ⊙ tanh(c_t)                                     then output
    h_t = h_t W_hr^T                                        only with a projection (proj_size P)

With reset (bool [T, B]), row b starts step t anew from h0[b], c0[b] where reset[t, b], as if its
sequence ended at t - 1 and a new one began at t. A reverse layer, which runs the later sequence
first, starts row b anew at step t - 1 instead (the last step of the earlier sequence).

Zoneout (Krueger et al. 2016) of c and h, with probabilities p_c, p_h, mixes each state with the
one before, where c_new, h_new are the step's results above (h_new from the unmixed c_new):
    c_t = d_c ⊙ c_{t-1} + (1 - d_c) ⊙ c_new,   h_t = d_h ⊙ h_{t-1} + (1 - d_h) ⊙ h_new
d is a bool mask in training (true: the unit keeps its previous value; a fresh one each step,
true with probability p) and the probability p itself in eval (the expectation).
Recurrent dropout (Gal and Ghahramani 2016) multiplies the h fed to W_hh by a mask m [B, P],
one per sequence (the whole call) and layer-direction, 0 or 1 / (1 - p):
    z = x_t W_ih^T + b_ih + (m ⊙ h_{t-1}) W_hh^T + b_hh
Both apply at every layer; the output, h_n and the next layer see h_t itself (unmasked).

Layer normalisation (Ba et al. 2016), haste's LayerNormLSTM: each of the two products is
normalised over its 4H values with a learnable gain (no bias of its own: b_ih + b_hh follow), and
so is the cell state inside the output tanh, with a gain and a bias; c_t itself goes on
unnormalised. LN(v) = (v - mean(v)) / sqrt(var(v) + 1e-5), var the biased variance (as
torch.nn.functional.layer_norm):
    z   = LN(x_t W_ih^T) ⊙ γ_ih + LN(h_{t-1} W_hh^T) ⊙ γ_hh + b_ih + b_hh      γ_ih, γ_hh [4H]
    h_t = o ⊙ tanh(LN(c_t) ⊙ γ_c + β_c)                                        γ_c, β_c [H]
(ln_weight_ih, ln_weight_hh, ln_weight_c, ln_bias_c; haste's gamma[0], gamma[1], gamma_h, beta_h).
With zoneout, LN(c_new) feeds h_new; with recurrent dropout, the masked h is the one multiplied.

Being plain differentiable PyTorch, it is also what lstm_ext differentiates through when a second
derivative is asked for (create_graph=True).
"""

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor


LAYER_NORM_EPS = 1e-5


def _layer_norm(v: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    return torch.nn.functional.layer_norm(v, v.shape[-1:], weight, bias, LAYER_NORM_EPS)


def layer_norm_cell_reference(x: Tensor, h: Tensor, c: Tensor, weight_ih: Tensor,
                              weight_hh: Tensor, bias_ih: Optional[Tensor],
                              bias_hh: Optional[Tensor], weight_hr: Optional[Tensor],
                              ln_weight_ih: Tensor, ln_weight_hh: Tensor, ln_weight_c: Tensor,
                              ln_bias_c: Tensor) -> Tuple[Tensor, Tensor]:
    """One step of the layer-normalised LSTM (the module docstring's equations) -> (h_t, c_t)."""
    z = _layer_norm(x @ weight_ih.T, ln_weight_ih) + _layer_norm(h @ weight_hh.T, ln_weight_hh)
    if bias_ih is not None:
        z = z + bias_ih + bias_hh
    z_i, z_f, z_g, z_o = z.chunk(4, dim=1)
    i, f, g, o = torch.sigmoid(z_i), torch.sigmoid(z_f), torch.tanh(z_g), torch.sigmoid(z_o)
    c = f * c + i * g
    h = o * torch.tanh(_layer_norm(c, ln_weight_c, ln_bias_c))
    if weight_hr is not None:
        h = h @ weight_hr.T
    return h, c


def lstm_cell_reference(x: Tensor, h: Tensor, c: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                        bias_ih: Optional[Tensor] = None, bias_hh: Optional[Tensor] = None,
                        weight_hr: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """One step: x [B, I], h [B, P], c [B, H] -> (h_t, c_t)."""
    z = x @ weight_ih.T + h @ weight_hh.T
    if bias_ih is not None:
        z = z + bias_ih + bias_hh
    z_i, z_f, z_g, z_o = z.chunk(4, dim=1)
    i, f, g, o = torch.sigmoid(z_i), torch.sigmoid(z_f), torch.tanh(z_g), torch.sigmoid(z_o)
    c = f * c + i * g
    h = o * torch.tanh(c)
    if weight_hr is not None:
        h = h @ weight_hr.T
    return h, c


def _restarting_rows(reset: Optional[Tensor], sizes: List[int], t: int,
                     reverse: bool) -> Optional[Tensor]:
    """Which of step t's sizes[t] rows start anew from h0 / c0 (bool [sizes[t]]), or None.
    The boundary before step t (forward) or after it (reverse) restarts the rows that run on
    both of its sides."""
    boundary = t + 1 if reverse else t
    if reset is None or not 0 < boundary < len(sizes):
        return None
    both_sides = sizes[boundary]  # <= sizes[boundary - 1]: a packed batch shrinks with time
    rows = torch.zeros(sizes[t], dtype=torch.bool, device=reset.device)
    rows[:both_sides] = reset[boundary, :both_sides]
    return rows


def _zoneout(mask: Optional[Tensor], p: float, previous: Tensor, new: Tensor) -> Tensor:
    """d ⊙ previous + (1 - d) ⊙ new: d the bool mask where given, else the probability p."""
    if mask is not None:
        return torch.where(mask, previous, new)
    return p * previous + (1 - p) * new if p else new


def _per_step(rows: Optional[Tensor], sizes: List[int], packed: bool) -> List[Optional[Tensor]]:
    """A per-row tensor in the input's layout ([T, B, .] or packed [N, .]) as one piece per step."""
    if rows is None:
        return [None] * len(sizes)
    return list(rows.split(sizes)) if packed else list(rows.unbind(0))


def lstm_layer_reference(input: Tensor, h0: Tensor, c0: Tensor, weight_ih: Tensor,
                         weight_hh: Tensor, bias_ih: Optional[Tensor] = None,
                         bias_hh: Optional[Tensor] = None, weight_hr: Optional[Tensor] = None,
                         batch_sizes: Optional[Tensor] = None, reverse: bool = False,
                         reset: Optional[Tensor] = None, zoneout_c: float = 0.0,
                         zoneout_h: float = 0.0, zoneout_mask_c: Optional[Tensor] = None,
                         zoneout_mask_h: Optional[Tensor] = None,
                         recurrent_mask: Optional[Tensor] = None,
                         ln_weight_ih: Optional[Tensor] = None,
                         ln_weight_hh: Optional[Tensor] = None,
                         ln_weight_c: Optional[Tensor] = None,
                         ln_bias_c: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """One layer, one direction.

    input [T, B, I], or a PackedSequence's data [N, I] with its batch_sizes [T] (step t holds the
    first batch_sizes[t] sequences); h0 [B, P], c0 [B, H]. A reverse layer runs from the last step
    to the first. reset: None or bool [T, B] (the module docstring says what it restarts).
    zoneout_mask_c / zoneout_mask_h: None or bool in the input's layout with H / P features (where
    None, zoneout_c / zoneout_h act as the expectation); recurrent_mask: None or [B, P].
    ln_*: the layer normalisation's parameters (all four, or None: no layer normalisation).
    Returns output (input's layout, P features), h_n [B, P], c_n [B, H]: each sequence's state
    after its last step.
    """
    if batch_sizes is None:
        steps, sizes = list(input.unbind(0)), [input.shape[1]] * input.shape[0]
    else:
        sizes = batch_sizes.tolist()
        steps = list(input.split(sizes))
    packed = batch_sizes is not None
    masks_c = _per_step(zoneout_mask_c, sizes, packed)
    masks_h = _per_step(zoneout_mask_h, sizes, packed)
    h, c = h0, c0
    outputs: List[Optional[Tensor]] = [None] * len(steps)
    for t in (reversed(range(len(steps))) if reverse else range(len(steps))):
        b = sizes[t]  # the sequences still running are the first b
        h_prev, c_prev = h[:b], c[:b]
        restarting = _restarting_rows(reset, sizes, t, reverse)
        if restarting is not None:
            h_prev = torch.where(restarting[:, None], h0[:b], h_prev)
            c_prev = torch.where(restarting[:, None], c0[:b], c_prev)
        h_fed = h_prev if recurrent_mask is None else h_prev * recurrent_mask[:b]
        if ln_weight_ih is None:
            h_t, c_t = lstm_cell_reference(steps[t], h_fed, c_prev, weight_ih, weight_hh,
                                           bias_ih, bias_hh, weight_hr)
        else:
            h_t, c_t = layer_norm_cell_reference(steps[t], h_fed, c_prev, weight_ih, weight_hh,
                                                 bias_ih, bias_hh, weight_hr, ln_weight_ih,
                                                 ln_weight_hh, ln_weight_c, ln_bias_c)
        c_t = _zoneout(masks_c[t], zoneout_c, c_prev, c_t)
        h_t = _zoneout(masks_h[t], zoneout_h, h_prev, h_t)
        h, c = torch.cat([h_t, h[b:]]), torch.cat([c_t, c[b:]])
        outputs[t] = h_t
    output = torch.stack(outputs) if batch_sizes is None else torch.cat(outputs)
    return output, h, c


def lstm_reference(input: Tensor, h0: Tensor, c0: Tensor, params: Sequence[Tensor],
                   has_biases: bool, has_projections: bool, num_layers: int, bidirectional: bool,
                   batch_sizes: Optional[Tensor] = None,
                   dropout_masks: Sequence[Tensor] = (),
                   zoneout_masks: Sequence[Optional[Tensor]] = (),
                   recurrent_masks: Sequence[Optional[Tensor]] = (),
                   reset: Optional[Tensor] = None, zoneout_c: float = 0.0,
                   zoneout_h: float = 0.0,
                   layer_norm: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """The whole of nn.LSTM's computation: layers, each of one or two directions.

    input [T, B, I], or a PackedSequence's data [N, I] with its batch_sizes; h0 [L*D, B, P],
    c0 [L*D, B, H] (D = 2 if bidirectional else 1); params in nn.LSTM's order, per layer and
    direction: weight_ih, weight_hh, (bias_ih, bias_hh), (weight_hr), then with layer_norm
    ln_weight_ih, ln_weight_hh, ln_weight_c, ln_bias_c. A layer's input is the
    previous layer's output, both directions' concatenated; dropout_masks, when given, are the
    dropout between layers: one per layer but the last, multiplied into that layer's output.
    zoneout_masks: in training, two per layer-direction (c's, then h's; None for a state not
    zoned out), else empty (eval: zoneout_c, zoneout_h act as the expectation); recurrent_masks:
    one per layer-direction ([B, P]) in training with recurrent dropout, else empty.
    reset: None or bool [T, B]: every layer restarts those rows from its own h0 / c0.
    Returns output (input's layout, D*P features), h_n [L*D, B, P], c_n [L*D, B, H].
    """
    directions = 2 if bidirectional else 1
    norms = 4 if layer_norm else 0
    per_layer = 2 + (2 if has_biases else 0) + (1 if has_projections else 0) + norms
    h_n: List[Tensor] = []
    c_n: List[Tensor] = []
    layer_input = input
    for layer in range(num_layers):
        outputs = []
        for direction in range(directions):
            index = layer * directions + direction
            weights = params[index * per_layer:(index + 1) * per_layer]
            biases = (weights[2], weights[3]) if has_biases else (None, None)
            weight_hr = weights[len(weights) - norms - 1] if has_projections else None
            ln_params = weights[len(weights) - norms:] if layer_norm else (None,) * 4
            output, h, c = lstm_layer_reference(layer_input, h0[index], c0[index], weights[0],
                                                weights[1], *biases, weight_hr, batch_sizes,
                                                reverse=direction == 1, reset=reset,
                                                zoneout_c=zoneout_c, zoneout_h=zoneout_h,
                                                zoneout_mask_c=zoneout_masks[2 * index]
                                                if zoneout_masks else None,
                                                zoneout_mask_h=zoneout_masks[2 * index + 1]
                                                if zoneout_masks else None,
                                                recurrent_mask=recurrent_masks[index]
                                                if recurrent_masks else None,
                                                ln_weight_ih=ln_params[0],
                                                ln_weight_hh=ln_params[1],
                                                ln_weight_c=ln_params[2], ln_bias_c=ln_params[3])
            outputs.append(output)
            h_n.append(h)
            c_n.append(c)
        layer_input = outputs[0] if directions == 1 else torch.cat(outputs, -1)
        if dropout_masks and layer < num_layers - 1:
            layer_input = layer_input * dropout_masks[layer]
    return layer_input, torch.stack(h_n), torch.stack(c_n)
