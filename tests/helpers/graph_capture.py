"""A torch.compile backend that records the graphs it is given, for graph-break and op-node checks."""

from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd


class GraphCapture:
    """A torch.compile backend that records the dynamo, AOT forward and AOT backward graphs.

    The graphs run eagerly (no Inductor: its C++ compile takes ~30 s on a 2-core CPU), which is enough
    to check graph breaks, the fake implementations and the autograd registration under AOTAutograd.
    """

    def __init__(self):
        self.dynamo_graphs, self.fw_graphs, self.bw_graphs = [], [], []

    def __call__(self, gm, example_inputs):
        self.dynamo_graphs.append(gm)

        def fw(graph, _):
            self.fw_graphs.append(graph)
            return make_boxed_func(graph.forward)

        def bw(graph, _):
            self.bw_graphs.append(graph)
            return make_boxed_func(graph.forward)

        return aot_autograd(fw_compiler=fw, bw_compiler=bw)(gm, example_inputs)


def count_calls(graphs, op) -> int:
    """Number of ``call_function`` nodes targeting ``op`` over all the graphs."""
    return sum(1 for g in graphs for node in g.graph.nodes if node.op == "call_function" and node.target == op)
