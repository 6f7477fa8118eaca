"""`prefetch(array, i)`: a hint to the CPU to bring array[i]'s cache line
in, for kernels whose next steps read memory at random (the graph mutex
watershed's union-find, mutex lists and hash table on a graph larger than
the caches). A hint only: it reads nothing, returns nothing and cannot
fault, so a kernel computes the same with or without it.

numba has no prefetch of its own; this emits LLVM's `llvm.prefetch`
(read, high locality, data cache)."""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


@intrinsic
def prefetch(typingctx, array, index):
    if not isinstance(array, types.Array) or array.ndim != 1 or not isinstance(index, types.Integer):
        return None
    signature = types.void(array, index)

    def codegen(context, builder, signature, args):
        array_type, index_type = signature.args
        data = context.make_array(array_type)(context, builder, args[0])
        at = context.cast(builder, args[1], index_type, types.intp)
        pointer = cgutils.get_item_pointer2(
            context, builder, data=data.data, shape=cgutils.unpack_tuple(builder, data.shape),
            strides=cgutils.unpack_tuple(builder, data.strides), layout=array_type.layout, inds=[at],
            wraparound=False, boundscheck=False,
        )
        byte_pointer = ir.IntType(8).as_pointer()
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer] + [ir.IntType(32)] * 3), "llvm.prefetch.p0"
        )
        # read (0), keep in every cache level (3), data (1)
        flags = [ir.Constant(ir.IntType(32), value) for value in (0, 3, 1)]
        builder.call(function, [builder.bitcast(pointer, byte_pointer), *flags])
        return context.get_dummy_value()

    return signature, codegen
