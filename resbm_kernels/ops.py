"""The public ResBM ops: ``torch.library`` custom ops under the ``resbm`` namespace.

Schemas, fake (meta) kernels and autograd registration live here, in one
place; the work is done by the backend :func:`resbm_kernels.backends.select`
picks for the inputs' device (reference, Triton or CUDA). Codecs are passed
to the ops as their string spec (``Codec.spec``); the Python wrappers at the
bottom accept :class:`~resbm_kernels.codec.Codec` objects. In plain eager
calls the wrappers of the four passes call the ops' functions without the
dispatcher (see :func:`_run`); ``torch.ops.resbm.*`` always dispatches.

Shapes: activations ``x`` are (N, d); ``w_e`` is the encoder weight (k, d)
and ``w_d`` the decoder weight (d, k), as in ``nn.Linear``; payloads are 1-D
uint8 in the wire format of :mod:`resbm_kernels.codec`. Activations and
weights are float32, float16 or bfloat16 (also float64 on the reference), one
dtype per call (the boundary's h may take another, ``out_dtype``; under
``torch.autocast`` only the boundary changes, see :func:`boundary`); k
divides d. The Triton and CUDA kernels need d and k multiples of 16 (``auto``
runs other shapes on the reference; a named backend raises).
"""

from __future__ import annotations

import inspect
import threading
import typing
from typing import Optional

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor

from . import checks
from .backends import Case, fast, reference, select
from .codec import Codec

# ---- standalone codec ops (reference implementation on every device) -------------


@torch.library.custom_op("resbm::quantize", mutates_args=())
def _quantize(z: Tensor, codec: str, seed: int) -> tuple[Tensor, Tensor]:
    c = _quantized_codec(codec)
    checks.tensor("z", z, ndim=2)
    return reference.quantize(z, c, seed)


@_quantize.register_fake
def _(z, codec, seed):
    c = _quantized_codec(codec)
    n, k = z.shape
    return z.new_empty((n, k), dtype=torch.int8), z.new_empty((n, k // c.group(k)), dtype=c.scale_dtype)


@torch.library.custom_op("resbm::dequantize", mutates_args=())
def _dequantize(codes: Tensor, scales: Tensor, codec: str, dtype: torch.dtype) -> Tensor:
    c = _quantized_codec(codec)
    _check_codes(codes, scales, c)
    return reference.dequantize(codes, scales, c, dtype)


@_dequantize.register_fake
def _(codes, scales, codec, dtype):
    return codes.new_empty(codes.shape, dtype=dtype)


@torch.library.custom_op("resbm::pack", mutates_args=())
def _pack(codes: Tensor, bits: int) -> Tensor:
    _check_pack(codes, bits)
    if codes.device.type == "cpu":  # (on a GPU the range check would wait for the device)
        checks.codes_fit(codes, bits)
    return reference.pack(codes, bits)


@_pack.register_fake
def _(codes, bits):
    _check_pack(codes, bits)
    return codes.new_empty((codes.shape[0], codes.shape[1] * bits // 8), dtype=torch.uint8)


@torch.library.custom_op("resbm::unpack", mutates_args=())
def _unpack(packed: Tensor, bits: int, k: int) -> Tensor:
    _check_unpack(packed, bits, k)
    return reference.unpack(packed, bits, k)


@_unpack.register_fake
def _(packed, bits, k):
    _check_unpack(packed, bits, k)
    return packed.new_empty((packed.shape[0], k), dtype=torch.int8)


# ---- the four fused passes -------------------------------------------------------
# Their ops, and the differentiable ones further down (boundary, wire_roundtrip,
# encode_project, decode_project), are called through _run: the dispatcher of a
# Python custom op costs more host time per call (~50 us on a 2-core EPYC,
# 2026-11-26) than some of these kernels take on a GPU, so in plain eager calls,
# where the dispatcher would do nothing but call the function, _run calls it itself
# (a differentiable op's through an autograd.Function of the same forward, setup and
# backward: torch's registered autograd also rebuilds the schema's argument list for
# every argument of every call, 27 us for the boundary).

_TENSOR = (Tensor, torch.nn.Parameter)
# the argument types each annotation takes in a direct call (others go through the dispatcher's checks)
_ACCEPTED = {Tensor: _TENSOR, Optional[Tensor]: (*_TENSOR, type(None)), float: (float, int), int: (int,),
             bool: (bool,), str: (str,), torch.dtype: (torch.dtype,),
             Optional[torch.dtype]: (torch.dtype, type(None))}
_functions: dict = {}  # op -> (its function, accepted types per argument, positions of the arguments it writes)
_autograd_functions: dict = {}  # differentiable op -> the autograd.Function _run applies in eager calls
_transform_functions: dict = {}  # op -> the autograd.Function _run applies under torch.func transforms
# .active: inside such a Function's backward, whose tensors are torch.func's though no transform is active there:
# the ops it calls take their transform Functions too
_transform_backward = threading.local()


def _custom_op(name: str, mutates_args=()):
    """``torch.library.custom_op("resbm::<name>")``, remembering the function for :func:`_run`."""
    def register(fn):
        op = torch.library.custom_op(f"resbm::{name}", mutates_args=mutates_args)(fn)
        hints = typing.get_type_hints(fn)
        params = list(inspect.signature(fn).parameters)
        _functions[op] = (fn, tuple(_ACCEPTED[hints[p]] for p in params),
                          tuple(params.index(arg) for arg in mutates_args))
        if not mutates_args:
            _transform_functions[op] = _transform_function(op)
        return op
    return register


def _transform_function(op, backward=None, setup_context=None):
    """The autograd.Function :func:`_run` applies under torch.func transforms
    (grad, vjp, vmap, jacrev, ...): the autograd.Function torch generates for a
    custom op lacks the setup_context they require (pytorch/pytorch#170834, open
    in torch 2.14). Its forward calls the op below autograd (under vmap the
    dispatcher's batching rule still applies: a loop). Without ``backward``
    (the four passes) differentiating through it raises: a pass has no
    derivative, so a gradient through the boundary's backward (a second
    derivative) is refused, not taken as zero."""
    def forward(*args):
        with torch._C._AutoDispatchBelowAutograd():
            return op._opoverload(*args)

    def backward_in_transform(ctx, *grads):
        active = getattr(_transform_backward, "active", False)
        _transform_backward.active = True
        try:
            return backward(ctx, *grads)
        finally:
            _transform_backward.active = active

    def jvp(ctx, *tangents):
        raise _no_forward_derivative(op)

    return type(f"resbm{op._name}_transformed", (torch.autograd.Function,), dict(
        forward=staticmethod(forward), setup_context=staticmethod(setup_context or (lambda ctx, inputs, output: None)),
        backward=staticmethod(backward_in_transform if backward else _no_derivative(op)), jvp=staticmethod(jvp),
        generate_vmap_rule=True))


def _no_derivative(op):
    """The backward of a pass: it has none (torch's default message would ask
    the caller to register one)."""
    def backward(ctx, *grads):
        raise RuntimeError(f"resbm_kernels: {op._qualname} has no derivative: differentiate through ops.boundary, "
                           "ops.wire_roundtrip or the nn modules; a second derivative through the boundary (its "
                           "backward runs the passes: create_graph=True, nested torch.func.grad) is not supported")
    return backward


def _no_forward_derivative(op) -> NotImplementedError:
    """The error for a tangent reaching ``op`` (no op here has a forward-mode rule)."""
    return NotImplementedError(f"resbm_kernels: {op._qualname}: forward-mode AD (torch.func.jvp, jacfwd, "
                               "forward_ad's dual tensors) is not supported; use reverse mode (backward, "
                               "torch.func.grad, vjp, jacrev)")


def _register_autograd(op, backward, setup_context) -> None:
    """``op.register_autograd``, and the same functions as the autograd.Function
    :func:`_run` applies in plain eager calls (with ``ctx`` in its forward: a
    separate setup_context would have torch bind the arguments with
    inspect.signature at every call, ~45 us)."""
    op.register_autograd(backward, setup_context=setup_context)
    fn = _functions[op][0]

    def forward(ctx, *args):
        output = fn(*args)
        setup_context(ctx, args, output)
        return output

    _autograd_functions[op] = type(f"resbm{fn.__name__}", (torch.autograd.Function,),
                                   dict(forward=staticmethod(forward), backward=staticmethod(backward)))

    _transform_functions[op] = _transform_function(op, backward, setup_context)


def _dispatch_needed(args, accepted, differentiable: bool = False) -> bool:
    """Whether calling the op could do more than call its function: inside
    torch.compile, a dispatch or torch-function mode (FakeTensorMode, ...), a
    torch.func transform or the profiler (which records the op); for an
    argument of another type than its annotation's (a tensor subclass, or one
    the schema rejects, with the dispatcher's message); when autograd would
    record and the op is not ``differentiable`` (a pass has no derivative: its
    outputs' backward must raise, as the op's does); for meta tensors (shapes
    only: the fake kernels); or under autocast (the ops' rules)."""
    C = torch._C
    if (torch.compiler.is_compiling() or C._len_torch_dispatch_stack() or C._is_torch_function_mode_enabled()
            or C._are_functorch_transforms_active() or C._autograd._profiler_enabled() or C._is_any_autocast_enabled()):
        return True
    grad = torch.is_grad_enabled() and not differentiable
    return any(type(a) not in ok or (isinstance(a, Tensor) and ((grad and a.requires_grad) or a.is_meta))
               for a, ok in zip(args, accepted))


def _run(op, *args):
    """``op(*args)``, or in plain eager calls its function directly (same result,
    less host time; the version counters of the buffers it writes move on, as
    the op's do), a differentiable op's through its autograd.Function; under a
    torch.func transform through :func:`_transform_function`'s."""
    fn, accepted, written = _functions[op]
    if forward_ad._current_level >= 0 and any(
            isinstance(a, Tensor) and forward_ad.unpack_dual(a).tangent is not None for a in args):
        raise _no_forward_derivative(op)  # (the kernels would drop the tangents)
    function = _autograd_functions.get(op)
    transformed = _transform_functions.get(op)
    if transformed is not None and (getattr(_transform_backward, "active", False)
                                    or torch._C._are_functorch_transforms_active()):
        if torch.compiler.is_compiling():  # (where torch's autograd of the op would fail, unnamed)
            raise RuntimeError(f"resbm_kernels: {op._qualname} under a torch.func transform inside torch.compile "
                               "is not supported (torch's custom-op autograd lacks setup_context there: "
                               "pytorch/pytorch#170834); run the transform uncompiled")
        return _apply_transformed(op, transformed, args)
    if _dispatch_needed(args, accepted, differentiable=function is not None):
        return op(*args)
    result = function.apply(*args) if function is not None else fn(*args)
    for i in written:
        torch.autograd.graph.increment_version(args[i])
    return result


def _apply_transformed(op, transformed, args):
    """``transformed.apply(*args)``, under autocast after the op's autocast rule
    (see :func:`_register_autocast`), applied here: the dispatcher's rule would
    run below torch.func's layer, where an autograd.Function cannot be applied."""
    device_type = next(a.device.type for a in args if isinstance(a, Tensor))
    if device_type not in _AUTOCAST_DEVICES or not torch.is_autocast_enabled(device_type):
        return transformed.apply(*args)
    if op is _boundary:
        args = _autocast_boundary_args(args, torch.get_autocast_dtype(device_type))
    with torch.autocast(device_type, enabled=False):
        return transformed.apply(*args)


def _encode_case(op, x, w_e, norm_weight, codec) -> Case:
    dtypes = (x.dtype, w_e.dtype) + ((norm_weight.dtype,) if norm_weight is not None else ())
    return Case(op, w_e.shape[1], w_e.shape[0], dtypes, (codec,))


def _decode_backward_case(grad_h, w_d, codec, grad_codec) -> Case:
    return Case("decode_backward", *w_d.shape, (grad_h.dtype, w_d.dtype), (codec, grad_codec))


def _row_stats_buffer(x, w_e, norm_weight, wanted: bool, fake: bool = False) -> Optional[Tensor]:
    """The (N, k+1) fp32 buffer encode forward fills with the RMSNorm row
    statistics when ``wanted`` (for encode backward: one pass less over x)."""
    if not wanted:
        return None
    checks.row_stats_have_norm(norm_weight)
    shape = (x.shape[0], w_e.shape[0] + 1)
    return x.new_empty(shape, dtype=torch.float32) if fake else fast.empty(shape, torch.float32, x.device)


@_custom_op("encode_forward")
def _encode_forward(
    x: Tensor, w_e: Tensor, norm_weight: Optional[Tensor], eps: float, codec: str, seed: int,
    row_stats: bool = False, seed_offset: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    c = Codec.parse(codec)
    checks.encoder_inputs(x, w_e, norm_weight, c, eps)
    offset = _device_offset(seed_offset, x.device)
    stats = _row_stats_buffer(x, w_e, norm_weight, row_stats)
    payload = select(x.device, _encode_case("encode_forward", x, w_e, norm_weight, c)).encode_forward(
        x, w_e, norm_weight, eps, c, seed, row_stats=stats, seed_offset=offset)
    return payload, _or_empty(stats, x)


@_encode_forward.register_fake
def _(x, w_e, norm_weight, eps, codec, seed, row_stats=False, seed_offset=None):
    c = Codec.parse(codec)
    checks.encoder_inputs(x, w_e, norm_weight, c, eps)
    checks.seed_offset(seed_offset, x.device)
    stats = _row_stats_buffer(x, w_e, norm_weight, row_stats, fake=True)
    return x.new_empty((c.payload_bytes(x.shape[0], w_e.shape[0]),), dtype=torch.uint8), _or_empty(stats, x)


@_custom_op("decode_forward")
def _decode_forward(
    payload: Tensor, w_d: Tensor, residual: Optional[Tensor], codec: str, n: int, out_dtype: torch.dtype
) -> Tensor:
    c = Codec.parse(codec)
    _check_decode(payload, w_d, residual, c, n, out_dtype)
    case = Case("decode_forward", *w_d.shape, (w_d.dtype, out_dtype), (c,))
    return select(w_d.device, case).decode_forward(payload, w_d, residual, c, n, out_dtype)


@_decode_forward.register_fake
def _(payload, w_d, residual, codec, n, out_dtype):
    c = Codec.parse(codec)
    _check_decode(payload, w_d, residual, c, n, out_dtype)
    return w_d.new_empty((n, w_d.shape[0]), dtype=out_dtype)


@_custom_op("decode_backward")
def _decode_backward(
    grad_h: Tensor, payload: Tensor, w_d: Tensor, codec: str, grad_codec: str, grad_seed: int,
    seed_offset: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    c, gc = Codec.parse(codec), Codec.parse(grad_codec)
    _check_decode_backward(grad_h, payload, w_d, c, gc)
    offset = _device_offset(seed_offset, w_d.device)
    return select(w_d.device, _decode_backward_case(grad_h, w_d, c, gc)).decode_backward(
        grad_h, payload, w_d, c, gc, grad_seed, seed_offset=offset)


@_decode_backward.register_fake
def _(grad_h, payload, w_d, codec, grad_codec, grad_seed, seed_offset=None):
    c, gc = Codec.parse(codec), Codec.parse(grad_codec)
    _check_decode_backward(grad_h, payload, w_d, c, gc)
    checks.seed_offset(seed_offset, w_d.device)
    n, k = grad_h.shape[0], w_d.shape[1]
    return grad_h.new_empty((gc.payload_bytes(n, k),), dtype=torch.uint8), torch.empty_like(w_d)


@_custom_op("encode_backward")
def _encode_backward(
    grad_payload: Tensor, x: Tensor, w_e: Tensor, norm_weight: Optional[Tensor], eps: float, grad_codec: str,
    row_stats: Optional[Tensor] = None,  # a default: traced graphs drop a trailing None argument
) -> tuple[Tensor, Tensor, Tensor]:
    gc = Codec.parse(grad_codec)
    _check_encode_backward(grad_payload, x, w_e, norm_weight, eps, gc, row_stats)
    case = _encode_case("encode_backward", x, w_e, norm_weight, gc)
    grad_x, grad_w, grad_gamma = select(x.device, case).encode_backward(
        grad_payload, x, w_e, norm_weight, eps, gc, row_stats=row_stats)
    return grad_x, grad_w, _or_empty(grad_gamma, x)


@_encode_backward.register_fake
def _(grad_payload, x, w_e, norm_weight, eps, grad_codec, row_stats=None):
    gc = Codec.parse(grad_codec)
    _check_encode_backward(grad_payload, x, w_e, norm_weight, eps, gc, row_stats)
    gamma = torch.empty_like(norm_weight) if norm_weight is not None else x.new_empty((0,))
    return torch.empty_like(x), torch.empty_like(w_e), gamma


# ---- the same passes writing into caller-owned payload buffers ---------------------------
# (a pipeline reuses its send buffers every step instead of allocating new ones)


@_custom_op("encode_forward_out", mutates_args=("out",))
def _encode_forward_out(
    out: Tensor, x: Tensor, w_e: Tensor, norm_weight: Optional[Tensor], eps: float, codec: str, seed: int,
    row_stats: bool = False, seed_offset: Optional[Tensor] = None,
) -> Tensor:
    c = Codec.parse(codec)
    checks.encoder_inputs(x, w_e, norm_weight, c, eps)
    checks.payload(out, c, x.shape[0], w_e.shape[0], x.device, read_header=False)
    offset = _device_offset(seed_offset, x.device)
    stats = _row_stats_buffer(x, w_e, norm_weight, row_stats)
    case = _encode_case("encode_forward", x, w_e, norm_weight, c)
    select(x.device, case).encode_forward(x, w_e, norm_weight, eps, c, seed, out=out, row_stats=stats,
                                          seed_offset=offset)
    return _or_empty(stats, x)


@_encode_forward_out.register_fake
def _(out, x, w_e, norm_weight, eps, codec, seed, row_stats=False, seed_offset=None):
    c = Codec.parse(codec)
    checks.encoder_inputs(x, w_e, norm_weight, c, eps)
    checks.payload(out, c, x.shape[0], w_e.shape[0], x.device, read_header=False)
    checks.seed_offset(seed_offset, x.device)
    return _or_empty(_row_stats_buffer(x, w_e, norm_weight, row_stats, fake=True), x)


@_custom_op("decode_backward_out", mutates_args=("out",))
def _decode_backward_out(
    out: Tensor, grad_h: Tensor, payload: Tensor, w_d: Tensor, codec: str, grad_codec: str, grad_seed: int,
    seed_offset: Optional[Tensor] = None,
) -> Tensor:
    c, gc = Codec.parse(codec), Codec.parse(grad_codec)
    _check_decode_backward(grad_h, payload, w_d, c, gc)
    checks.payload(out, gc, grad_h.shape[0], w_d.shape[1], w_d.device, read_header=False)
    offset = _device_offset(seed_offset, w_d.device)
    case = _decode_backward_case(grad_h, w_d, c, gc)
    return select(w_d.device, case).decode_backward(grad_h, payload, w_d, c, gc, grad_seed, out=out,
                                                    seed_offset=offset)[1]


@_decode_backward_out.register_fake
def _(out, grad_h, payload, w_d, codec, grad_codec, grad_seed, seed_offset=None):
    c, gc = Codec.parse(codec), Codec.parse(grad_codec)
    _check_decode_backward(grad_h, payload, w_d, c, gc)
    checks.payload(out, gc, grad_h.shape[0], w_d.shape[1], w_d.device, read_header=False)
    checks.seed_offset(seed_offset, w_d.device)
    return torch.empty_like(w_d)


# ---- differentiable ops ------------------------------------------------------------


def _check_grad_codec(grad_codec: str, k: int) -> None:
    """The gradient codec must fit k too: raise in the forward, not first in the backward."""
    try:
        Codec.parse(grad_codec).group(k)
    except ValueError as e:
        raise ValueError(f"grad_codec: {e}") from None


def _device_offset(seed_offset: Optional[Tensor], device) -> Optional[Tensor]:
    """``seed_offset`` as one int64 on ``device``, where the kernels read it:
    never on the host, so nothing waits for the device and a CUDA graph's
    replay rounds with the offset's value at replay (see :func:`boundary`)."""
    checks.seed_offset(seed_offset, device)
    return None if seed_offset is None else seed_offset.to(device=device, dtype=torch.int64).reshape(())


@_custom_op("boundary")
def _boundary(
    x: Tensor,
    w_e: Tensor,
    norm_weight: Optional[Tensor],
    w_d: Tensor,
    residual: Optional[Tensor],
    eps: float,
    codec: str,
    grad_codec: str,
    seed: int,
    grad_seed: int,
    row_stats: bool = True,
    out_dtype: Optional[torch.dtype] = None,
    seed_offset: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(h in ``out_dtype`` (default x's), payload, RMSNorm row statistics for
    the backward when ``row_stats``, else an empty tensor)."""
    _check_grad_codec(grad_codec, w_e.shape[0])
    # (inside an op, below autograd and any mode: the passes' functions are called directly)
    encode, decode = _functions[_encode_forward][0], _functions[_decode_forward][0]
    payload, stats = encode(x, w_e, norm_weight, eps, codec, seed, row_stats and norm_weight is not None, seed_offset)
    return decode(payload, w_d, residual, codec, x.shape[0], out_dtype or x.dtype), payload, stats


@_boundary.register_fake
def _(x, w_e, norm_weight, w_d, residual, eps, codec, grad_codec, seed, grad_seed, row_stats=True, out_dtype=None,
      seed_offset=None):
    _check_grad_codec(grad_codec, w_e.shape[0])
    payload, stats = _encode_forward(x, w_e, norm_weight, eps, codec, seed, row_stats and norm_weight is not None,
                                     seed_offset)
    return _decode_forward(payload, w_d, residual, codec, x.shape[0], out_dtype or x.dtype), payload, stats


def _boundary_setup(ctx, inputs, output):
    x, w_e, norm_weight, w_d, residual, eps, codec, grad_codec, seed, grad_seed, row_stats, _, seed_offset = inputs
    stats = output[2] if row_stats and norm_weight is not None else None
    ctx.mark_non_differentiable(output[1], output[2])  # (no zero gradients made for them)
    ctx.save_for_backward(x, w_e, norm_weight, w_d, output[1], stats, seed_offset)
    ctx.eps, ctx.codec, ctx.grad_codec, ctx.grad_seed = eps, codec, grad_codec, grad_seed
    ctx.has_residual = residual is not None


def _boundary_backward(ctx, grad_h, _grad_payload, _grad_stats):
    x, w_e, norm_weight, w_d, payload, stats, seed_offset = ctx.saved_tensors
    grad_residual = grad_h if ctx.has_residual else None
    # the backward's GEMMs in the forward's dtype (h's may differ: out_dtype, autocast);
    # contiguous: a gradient of .sum() is stride-0
    grad_h = grad_h.to(x.dtype).contiguous()
    grad_payload, grad_w_d = _run(_decode_backward, grad_h, payload, w_d, ctx.codec, ctx.grad_codec, ctx.grad_seed,
                                  seed_offset)
    grad_x, grad_w_e, grad_gamma = _run(_encode_backward, grad_payload, x, w_e, norm_weight, ctx.eps, ctx.grad_codec,
                                        stats)
    return (
        grad_x,
        grad_w_e,
        grad_gamma if norm_weight is not None else None,
        grad_w_d,
        grad_residual,
        None, None, None, None, None, None, None, None,
    )


_register_autograd(_boundary, _boundary_backward, _boundary_setup)
for _pass in (_encode_forward, _decode_forward, _decode_backward, _encode_backward):
    _pass.register_autograd(_no_derivative(_pass))


@_custom_op("wire_roundtrip")
def _wire_roundtrip(z: Tensor, codec: str, grad_codec: str, seed: int, grad_seed: int,
                    seed_offset: Optional[Tensor] = None) -> Tensor:
    c = Codec.parse(codec)
    checks.tensor("z", z, ndim=2)
    c.group(z.shape[1])
    _check_grad_codec(grad_codec, z.shape[1])
    n, k = z.shape
    seed = reference.offset_seed(seed, _device_offset(seed_offset, z.device))
    return reference.read_payload(reference.write_payload(z, c, seed), c, n, k, z.dtype)


@_wire_roundtrip.register_fake
def _(z, codec, grad_codec, seed, grad_seed, seed_offset=None):
    checks.tensor("z", z, ndim=2)
    Codec.parse(codec).group(z.shape[1])
    _check_grad_codec(grad_codec, z.shape[1])
    checks.seed_offset(seed_offset, z.device)
    return torch.empty_like(z)


def _roundtrip_setup(ctx, inputs, output):
    ctx.grad_codec, ctx.grad_seed = inputs[2], inputs[4]
    ctx.save_for_backward(inputs[5])


def _roundtrip_backward(ctx, grad):
    # straight-through: the gradient crosses the wire with the gradient codec
    seed_offset, = ctx.saved_tensors
    return (_run(_wire_roundtrip, grad.contiguous(), ctx.grad_codec, ctx.grad_codec, ctx.grad_seed, 0, seed_offset),
            None, None, None, None, None)


_register_autograd(_wire_roundtrip, _roundtrip_backward, _roundtrip_setup)


@_custom_op("encode_project")
def _encode_project(x: Tensor, w_e: Tensor, norm_weight: Optional[Tensor], eps: float) -> Tensor:
    checks.encoder_inputs(x, w_e, norm_weight, Codec(bits=16), eps)
    return reference.encode_project(x, w_e, norm_weight, eps).to(x.dtype)


@_encode_project.register_fake
def _(x, w_e, norm_weight, eps):
    return x.new_empty((x.shape[0], w_e.shape[0]))


def _encode_project_setup(ctx, inputs, output):
    x, w_e, norm_weight, eps = inputs
    ctx.save_for_backward(x, w_e, norm_weight)
    ctx.eps = eps


def _encode_project_backward(ctx, grad_z):
    x, w_e, norm_weight = ctx.saved_tensors
    ct = reference.compute_dtype(x)
    grad_x, grad_w, grad_gamma = reference.encode_backward_dense(grad_z.to(ct), x, w_e, norm_weight, ctx.eps)
    grad_gamma = None if grad_gamma is None else grad_gamma.to(norm_weight.dtype)
    return grad_x.to(x.dtype), grad_w.to(w_e.dtype), grad_gamma, None


_register_autograd(_encode_project, _encode_project_backward, _encode_project_setup)


@_custom_op("decode_project")
def _decode_project(zhat: Tensor, w_d: Tensor, residual: Optional[Tensor]) -> Tensor:
    _check_decode_project(zhat, w_d, residual)
    return reference.decode_project(zhat, w_d, residual, zhat.dtype)


@_decode_project.register_fake
def _(zhat, w_d, residual):
    _check_decode_project(zhat, w_d, residual)
    return zhat.new_empty((zhat.shape[0], w_d.shape[0]))


def _check_decode_project(zhat, w_d, residual):
    checks.tensor("zhat", zhat, ndim=2)
    checks.tensor("w_d", w_d, ndim=2, device=zhat.device)
    checks.same_dtype("w_d", w_d, zhat.dtype)
    d, k = w_d.shape
    checks.bottleneck(d, k)
    checks.shape("zhat", zhat, (zhat.shape[0], k))
    _check_residual(residual, zhat.shape[0], d, zhat.dtype, zhat.device)


def _decode_project_setup(ctx, inputs, output):
    zhat, w_d, residual = inputs
    ctx.save_for_backward(zhat, w_d)
    ctx.has_residual = residual is not None


def _decode_project_backward(ctx, grad_h):
    zhat, w_d = ctx.saved_tensors
    grad_zhat, grad_w_d = reference.decode_backward_dense(grad_h, zhat, w_d)
    return grad_zhat.to(zhat.dtype), grad_w_d.to(w_d.dtype), grad_h if ctx.has_residual else None


_register_autograd(_decode_project, _decode_project_backward, _decode_project_setup)


# ---- autocast ------------------------------------------------------------------------
# Under torch.autocast the fused boundary runs its GEMMs in the autocast dtype and
# returns h in x's dtype (see boundary). Every other op runs in its inputs' dtypes on
# every backend alike: without a rule of their own the reference's matmuls would be
# autocast and the kernels' would not.

_autocast_lib = torch.library.Library("resbm", "FRAGMENT")


def _autocast_eligible(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """t in the autocast dtype (autocast leaves float64 alone, as here)."""
    return t if t is None or t.dtype == torch.float64 else t.to(dtype)


def _register_autocast(device_type: str) -> None:
    key = "Autocast" + torch._C._dispatch_key_for_device(device_type)

    def boundary_kernel(x, w_e, norm_weight, w_d, residual, eps, codec, grad_codec, seed, grad_seed, row_stats=True,
                        out_dtype=None, seed_offset=None):
        args = (x, w_e, norm_weight, w_d, residual, eps, codec, grad_codec, seed, grad_seed, row_stats, out_dtype,
                seed_offset)
        with torch.autocast(device_type, enabled=False):
            return _boundary(*_autocast_boundary_args(args, torch.get_autocast_dtype(device_type)))

    def without_autocast(op):
        def kernel(*args):
            with torch.autocast(device_type, enabled=False):
                return op(*args)
        return kernel

    _autocast_lib.impl("boundary", boundary_kernel, key)
    for name in _AUTOCAST_FREE:
        _autocast_lib.impl(name, without_autocast(getattr(torch.ops.resbm, name).default), key)


def _autocast_boundary_args(args, dtype: torch.dtype) -> tuple:
    """The boundary's arguments under autocast: x and the weights in ``dtype``, h in x's dtype."""
    x, w_e, norm_weight, w_d, residual, eps, codec, grad_codec, seed, grad_seed, row_stats, out_dtype, offset = args
    return (*(_autocast_eligible(t, dtype) for t in (x, w_e, norm_weight, w_d)), residual, eps, codec, grad_codec,
            seed, grad_seed, row_stats, out_dtype or x.dtype, offset)


_AUTOCAST_FREE = ("quantize", "dequantize", "pack", "unpack", "encode_forward", "encode_forward_out", "decode_forward",
                 "decode_backward", "decode_backward_out", "encode_backward", "wire_roundtrip", "encode_project",
                 "decode_project")
_AUTOCAST_DEVICES = ("cpu", "cuda")
for _device_type in _AUTOCAST_DEVICES:
    _register_autocast(_device_type)


# ---- validation helpers ------------------------------------------------------------


def _quantized_codec(spec: str) -> Codec:
    c = Codec.parse(spec)
    if not c.quantized:
        raise ValueError(f"codec {c.spec} has no integer codes; quantize/dequantize need bits 8, 4 or 2")
    return c


def _check_codes(codes, scales, c: Codec):
    checks.tensor("codes", codes, ndim=2, dtypes=(torch.int8,))
    n, k = codes.shape
    checks.tensor("scales", scales, ndim=2, dtypes=(c.scale_dtype,), device=codes.device)
    checks.shape("scales", scales, (n, k // c.group(k)))


def _check_bits(op: str, bits, k):
    Codec(bits=bits)
    if bits == 16:
        raise ValueError(f"{op}: bits=16 is the bf16 passthrough, which has no integer codes; use bits 8, 4 or 2")
    if (k * bits) % 8:
        raise ValueError(f"{op}: {k} values of {bits} bits are not a whole number of bytes")


def _check_pack(codes, bits):
    checks.tensor("codes", codes, ndim=2, dtypes=(torch.int8,))
    _check_bits("pack", bits, codes.shape[1])


def _check_unpack(packed, bits, k):
    _check_bits("unpack", bits, k)
    checks.tensor("packed", packed, ndim=2, dtypes=(torch.uint8,))
    checks.shape("packed", packed, (packed.shape[0], k * bits // 8))


def _check_decode(payload, w_d, residual, c: Codec, n, out_dtype):
    checks.decoder_weight(w_d, c)
    if out_dtype not in checks.FLOAT_DTYPES:
        raise TypeError(f"out_dtype {out_dtype} is not a supported float dtype")
    if n < 0:
        raise ValueError(f"n={n} rows must be non-negative")
    checks.payload(payload, c, n, w_d.shape[1], w_d.device)
    _check_residual(residual, n, w_d.shape[0], out_dtype, w_d.device)


def _check_residual(residual, n, d, dtype, device):
    """An optional (n, d) residual of the output's dtype, on its device."""
    if residual is not None:
        checks.tensor("residual", residual, ndim=2, device=device)
        if residual.dtype != dtype:
            raise TypeError(f"residual: dtype {residual.dtype} differs from the output's {dtype}")
        checks.shape("residual", residual, (n, d))


def _check_decode_backward(grad_h, payload, w_d, c: Codec, gc: Codec):
    checks.decoder_weight(w_d, c)
    gc.group(w_d.shape[1])
    checks.tensor("grad_h", grad_h, ndim=2, device=w_d.device)
    checks.shape("grad_h", grad_h, (grad_h.shape[0], w_d.shape[0]))
    checks.payload(payload, c, grad_h.shape[0], w_d.shape[1], w_d.device)


def _check_encode_backward(grad_payload, x, w_e, norm_weight, eps, gc: Codec, row_stats):
    checks.encoder_inputs(x, w_e, norm_weight, gc, eps)
    checks.payload(grad_payload, gc, x.shape[0], w_e.shape[0], x.device)
    if row_stats is not None:
        checks.row_stats(row_stats, x, w_e, norm_weight)


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    return t if t is not None else like.new_empty((0,))


# ---- Python API (what training code calls) -------------------------------------------


def quantize(z: Tensor, codec: Codec | str, seed: int = 0) -> tuple[Tensor, Tensor]:
    """z (N, k) -> (int8 codes (N, k), scales (N, k/group))."""
    return _quantize(z, Codec.parse(codec).spec, seed)


def dequantize(codes: Tensor, scales: Tensor, codec: Codec | str, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of :func:`quantize` (up to rounding)."""
    return _dequantize(codes, scales, Codec.parse(codec).spec, dtype)


def pack(codes: Tensor, bits: int) -> Tensor:
    """int8 codes (N, k) in range for ``bits`` -> uint8 (N, k*bits/8).

    Codes outside [-2^(bits-1), 2^(bits-1) - 1] raise on the CPU; on a GPU they
    are not checked (that would wait for the device) and keep their low bits."""
    return _pack(codes, bits)


def unpack(packed: Tensor, bits: int, k: int) -> Tensor:
    """uint8 (N, k*bits/8) -> sign-extended int8 codes (N, k)."""
    return _unpack(packed, bits, k)


def encode(x: Tensor, w_e: Tensor, codec: Codec | str, *, norm_weight: Optional[Tensor] = None,
           eps: float = 1e-6, seed: int = 0, seed_offset: Optional[Tensor] = None, out: Optional[Tensor] = None,
           return_row_stats: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Encode forward: x (N, d) -> payload of z = RMSNorm(x) W_e^T + x[:, :k].

    ``seed`` (a stochastic ``codec``'s rounding) and ``seed_offset``: as in :func:`boundary`.
    ``out``: a uint8 buffer of ``codec.payload_bytes(N, k)`` bytes to write
    into (and return) instead of allocating a new payload.
    ``return_row_stats`` (RMSNorm only): return ``(payload, row_stats)``, the
    (N, k+1) float32 row statistics [RMSNorm(x) W_e^T | 1/rms(x)] the pass
    computes anyway; handing them to :func:`encode_backward` for the same x
    saves its pass over x for them (they cost N(k+1) fp32 of memory until then)."""
    spec = Codec.parse(codec).spec
    if out is None:
        payload, stats = _run(_encode_forward, x, w_e, norm_weight, eps, spec, seed, return_row_stats, seed_offset)
    else:
        payload, stats = out, _run(_encode_forward_out, out, x, w_e, norm_weight, eps, spec, seed, return_row_stats,
                                   seed_offset)
    return (payload, stats.detach()) if return_row_stats else payload  # statistics, not differentiable


def decode(payload: Tensor, w_d: Tensor, codec: Codec | str, n: int, *, residual: Optional[Tensor] = None,
           out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Decode forward: payload -> h = zhat W_d^T + pad_d(zhat) (+ residual), (n, d).

    ``n``: the rows (tokens) the payload carries, as the sender encoded them;
    ``out_dtype``: by default the residual's dtype, else w_d's."""
    out_dtype = out_dtype or (residual.dtype if residual is not None else w_d.dtype)
    return _run(_decode_forward, payload, w_d, residual, Codec.parse(codec).spec, n, out_dtype)


def decode_backward(grad_h: Tensor, payload: Tensor, w_d: Tensor, codec: Codec | str, grad_codec: Codec | str, *,
                    grad_seed: int = 1, seed_offset: Optional[Tensor] = None,
                    out: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """grad_h (N, d) -> (gradient payload of dL/dzhat, grad of w_d); ``out``
    as in :func:`encode`, for the gradient payload. ``grad_seed`` (a stochastic
    ``grad_codec``'s rounding) defaults to :func:`boundary`'s, so the passes
    called one by one with their defaults give what it gives; ``seed_offset``
    as in :func:`boundary`."""
    specs = Codec.parse(codec).spec, Codec.parse(grad_codec).spec
    if out is None:
        return _run(_decode_backward, grad_h, payload, w_d, *specs, grad_seed, seed_offset)
    return out, _run(_decode_backward_out, out, grad_h, payload, w_d, *specs, grad_seed, seed_offset)


def encode_backward(grad_payload: Tensor, x: Tensor, w_e: Tensor, grad_codec: Codec | str, *,
                    norm_weight: Optional[Tensor] = None, eps: float = 1e-6,
                    row_stats: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Gradient payload -> (grad_x, grad_w_e, grad_norm_weight or None).

    ``row_stats``: what :func:`encode` returned with ``return_row_stats=True``
    for this x, w_e, norm_weight and eps (not checkable here: stale statistics
    give wrong gradients). The Triton and CUDA kernels then skip their pass
    over x for them; the reference recomputes them."""
    gx, gw, gg = _run(_encode_backward, grad_payload, x, w_e, norm_weight, eps, Codec.parse(grad_codec).spec,
                      row_stats)
    return gx, gw, gg if norm_weight is not None else None


def boundary(x: Tensor, w_e: Tensor, w_d: Tensor, codec: Codec | str, grad_codec: Codec | str, *,
             norm_weight: Optional[Tensor] = None, residual: Optional[Tensor] = None, eps: float = 1e-6,
             seed: int = 0, grad_seed: int = 1, out_dtype: Optional[torch.dtype] = None,
             seed_offset: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Differentiable encode -> wire -> decode in one process: returns (h, payload).

    The backward sends dL/dzhat through ``grad_codec`` (straight-through
    estimator), exactly as the pipeline does across processes. ``out_dtype``:
    h's dtype, and ``residual``'s (default x's), e.g. float32 h from bfloat16
    GEMMs. Under ``torch.autocast`` x and the weights are cast to the autocast
    dtype, as ``nn.Linear``'s would be, and h keeps x's dtype: it replaces the
    residual stream x. ``seed_offset``: a one-element integer tensor on x's
    device (or the CPU: then copied there) whose value is added to ``seed`` and
    ``grad_seed`` (modulo 2**64), for seeds that change every call (a call
    counter, as :class:`~resbm_kernels.nn.ResBMBoundary` keeps). The kernels
    read it on the device when they run, never on the host: nothing waits for
    it, a CUDA graph's replay rounds with its value at replay, and a
    torch.compile'd graph takes it as an input (a changing int would be a
    constant that recompiles the graph at every call).
    """
    # the row statistics only when a backward can follow (they cost N(k+1) fp32 of writes)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (x, w_e, norm_weight, w_d, residual))
    h, payload, _ = _run(_boundary, x, w_e, norm_weight, w_d, residual, eps, Codec.parse(codec).spec,
                         Codec.parse(grad_codec).spec, seed, grad_seed, grad, out_dtype, seed_offset)
    return h, payload


def wire_roundtrip(z: Tensor, codec: Codec | str, grad_codec: Codec | str, *, seed: int = 0, grad_seed: int = 1,
                   seed_offset: Optional[Tensor] = None) -> Tensor:
    """Differentiable quantize -> pack -> unpack -> dequantize of z (N, k) with
    straight-through gradients (the gradient makes the trip with ``grad_codec``);
    ``seed_offset`` as in :func:`boundary`."""
    return _run(_wire_roundtrip, z, Codec.parse(codec).spec, Codec.parse(grad_codec).spec, seed, grad_seed,
                seed_offset)


def encode_project(x: Tensor, w_e: Tensor, *, norm_weight: Optional[Tensor] = None, eps: float = 1e-6) -> Tensor:
    """z = RMSNorm(x) W_e^T + x[:, :k] without the wire (the linear encoder's
    projection, as :meth:`ResBMEncoder.project <resbm_kernels.nn.ResBMEncoder.project>` uses it)."""
    return _run(_encode_project, x, w_e, norm_weight, eps)


def decode_project(zhat: Tensor, w_d: Tensor, *, residual: Optional[Tensor] = None) -> Tensor:
    """h = zhat W_d^T + pad_d(zhat) (+ residual) without the wire."""
    return _run(_decode_project, zhat, w_d, residual)
