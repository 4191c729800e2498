"""Prints the table of every network in docs/models.md: parameters and forward multiply-adds, ours beside the paper's.

    python -m experiments.model_table
"""

from resnet_jax import models

# Table 1 (multiply-adds) and section 4.2 / Table 6 (parameters, CIFAR), as the paper prints them.
PAPER_MACS = {18: "1.8", 34: "3.6", 50: "3.8", 101: "7.6", 152: "11.3"}
PAPER_PARAMS = {20: "0.27M", 32: "0.46M", 44: "0.66M", 56: "0.85M", 110: "1.7M", 1202: "19.4M"}


def main() -> None:
    print("| network | family | shortcut | parameters | paper | multiply-adds (every tap) | XLA cost analysis "
          "| paper |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for depth in models.IMAGENET_STAGES:
        for kind in ("resnet", "plain"):
            model = models.create(f"{kind}{depth}")
            params = models.count_params(models.abstract_variables(model)["params"])
            dense, xla = models.analytic_macs(model) / 1e9, models.forward_macs(model) / 1e9
            paper = PAPER_MACS[depth] + "G" if kind == "resnet" else ""
            print(f"| {kind}{depth} | ImageNet | {model.shortcut} | {params:,} | | {dense:.2f}G | {xla:.2f}G | "
                  f"{paper} |")
    for depth in models.CIFAR_PAPER_DEPTHS:
        for kind in ("resnet", "plain"):
            model = models.create(f"{kind}{depth}")
            params = models.count_params(models.abstract_variables(model)["params"])
            dense = models.analytic_macs(model) / 1e6
            paper = PAPER_PARAMS[depth] if kind == "resnet" else ""
            print(f"| {kind}{depth} | CIFAR | {model.shortcut} | {params:,} | {paper} | {dense:.1f}M | | |")


if __name__ == "__main__":
    main()
