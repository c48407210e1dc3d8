"""titan_v4.tools.kernel_inventory: reading Inductor's generated code (the CUDA / Triton layout
too, which the CPU tests cannot produce), decoding fused-kernel names, and the per-kind counts."""

import collections

from titan_v4.tools.graph_recorder import CompiledPart, DynamoGraph, OpCall
from titan_v4.tools.kernel_inventory import KindInventory, fused_ops, read_generated_code

# The shape of a generated module on CUDA (abridged from Inductor's output): kernel definitions with
# their source in triple quotes, comments naming ops, then the wrapper that calls everything.
TRITON_MODULE = """
# kernel path: /tmp/torchinductor_x/ab/cabc.py
# Topologically Sorted Source Nodes: [add, mul], Original ATen: [aten.add, aten.mul]
triton_poi_fused_add_mul_0 = async_compile.triton('triton_poi_fused_add_mul_0', '''
@triton.jit
def triton_poi_fused_add_mul_0(in_ptr0, out_ptr0, xnumel, XBLOCK : tl.constexpr):
    extern_kernels.mm(fake)  # inside the kernel source: not a call of the wrapper
''', device_str='cuda')
triton_red_fused__to_copy_mean_pow_1 = async_compile.triton('triton_red_fused__to_copy_mean_pow_1', '''
''', device_str='cuda')
async_compile.wait(globals())

def call(args):
    primals_1, primals_2 = args
    # Topologically Sorted Source Nodes: [linear], Original ATen: [aten.mm]
    extern_kernels.mm(primals_1, primals_2, out=buf0)
    triton_poi_fused_add_mul_0.run(buf0, buf1, 64, stream=stream0)
    triton_poi_fused_add_mul_0.run(buf1, buf2, 64, stream=stream0)
    buf3 = torch.ops.v4.sparse_attention.default(buf2, buf1, primals_2, None, None, None, 6, 0.25, 1)
    assert_alignment(buf4, 16, 'torch.ops.v4.sinkhorn.default')
    buf5 = torch.ops._c10d_functional.all_to_all_single.default(buf2, [u0, u1], [2, 3], '0')
    triton_red_fused__to_copy_mean_pow_1.run(buf3, buf5, 8, 64, stream=stream0)
    return (buf5, )
"""


def test_reads_triton_kernels_and_wrapper_calls():
    code = read_generated_code(TRITON_MODULE)
    assert code.kernels == {"triton_poi_fused_add_mul_0": 2, "triton_red_fused__to_copy_mean_pow_1": 1}
    assert code.extern_calls == collections.Counter(
        {"extern_kernels.mm": 1, "v4.sparse_attention.default": 1, "_c10d_functional.all_to_all_single.default": 1}
    )


def test_decodes_fused_kernel_names_against_the_graph_ops():
    vocabulary = {"_to_copy", "mean", "pow", "add", "mul", "_unsafe_view", "view", "split_with_sizes"}
    assert fused_ops("triton_red_fused__to_copy_mean_pow_1", vocabulary) == "_to_copy, mean, pow"
    assert fused_ops("cpp_fused__unsafe_view_add_split_with_sizes_view_12", vocabulary) == "_unsafe_view, add, split_with_sizes, view"
    assert fused_ops("cpp_fused_add_frobnicate_3", vocabulary) == "add_frobnicate"  # undecodable: the raw part
    assert fused_ops("_fill_indices_kernel_0", vocabulary) == "-"  # a user Triton kernel: no fusion


def test_counts_are_per_block_and_per_step():
    mm = OpCall("aten.mm.default", ("bfloat16", "bfloat16"), (("8", "16"), ("16", "4")), "mm")
    addmm = OpCall("aten.addmm.default", ("float32", "float32", "float32"), (("4",), ("8", "16"), ("16", "4")), "addmm")
    attn = OpCall("v4.sparse_attention.default", ("bfloat16",), (("1", "8", "2", "4"),), "")
    graph = DynamoGraph(kind="csa-learned", step=1, code="")
    graph.forward = CompiledPart(aot_graph="", lowered_ops=[mm, mm, attn], output_code=TRITON_MODULE)
    graph.backward = CompiledPart(aot_graph="", lowered_ops=[addmm], output_code=TRITON_MODULE)
    late = DynamoGraph(kind="csa-learned", step=2, code="")  # compiled in step 2: a recompile
    inventory = KindInventory.build("csa-learned", ["layers.1", "layers.3"], "inductor", [graph, late], {})
    assert (inventory.graphs, inventory.recompiles) == (2, 1)
    assert inventory.gemm_dtypes() == {"bf16 x bf16": 4, "fp32 x fp32": 2}  # addmm: its two matrices
    text = inventory.summary()
    assert "custom ops per block (fw/bw): v4.sparse_attention.default 1/0" in text
    assert "generated kernels per block (fw/bw): 2/2 kernels, 3/3 calls" in text
    assert "GEMMs per block (fw/bw): 2/1" in text
    assert "| `v4.sparse_attention.default` | 1 | 0 | 2 |" in inventory.markdown()
