"""A picture of the task tree: tasks at the leaves, the split's module and median at internal nodes."""
from __future__ import annotations

from jaxtree_lora import atomic
from jaxtree_lora.tree.tree import Tree, to_nested


def _layout(node, depth, next_x, positions, edges, parent=None):
    if not node:
        return next_x
    if "left" in node:
        next_x = _layout(node["left"], depth + 1, next_x, positions, edges, id(node))
        next_x = _layout(node["right"], depth + 1, next_x, positions, edges, id(node))
        xs = [positions[id(node["left"])][0], positions[id(node["right"])][0]]
        positions[id(node)] = (sum(xs) / 2, -depth, node)
    else:
        positions[id(node)] = (next_x, -depth, node)
        next_x += 1
    if parent is not None:
        edges.append((parent, id(node)))
    return next_x


def draw(tree: Tree, path: str, title: str = "task tree") -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    root = to_nested(tree)
    positions, edges = {}, []
    width = _layout(root, 0, 0, positions, edges)
    fig = Figure(figsize=(max(4, 1.4 * width + 1), 3 + 0.6 * max((-y for _, y, _ in positions.values()), default=0)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for a, b in edges:
        (x0, y0, _), (x1, y1, _) = positions[a], positions[b]
        ax.plot([x0, x1], [y0, y1], color="0.6", zorder=1)
    for x, y, node in positions.values():
        if "left" in node:
            label = f"module {node['depth']}\nmedian {node['median_similarity']:.3g}"
            color = "#cfe2f3"
        else:
            label = "task " + ",".join(str(t) for t in node["tasks"])
            color = "#d9ead3"
        ax.text(x, y, label, ha="center", va="center", fontsize=8, zorder=2,
                bbox=dict(boxstyle="round", facecolor=color, edgecolor="0.4"))
    ax.set_title(title if root else f"{title} (no task stored yet)")
    ax.axis("off")
    ax.margins(0.15)
    fig.tight_layout()
    atomic.save_figure(fig, path)
