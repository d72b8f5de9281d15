"""`make bench`: every benchmark with its default settings, each printing its Markdown section."""

from bench import attack_cost, defense_cost, igat_step, pgd_throughput

if __name__ == "__main__":
    pgd_throughput.main([])
    pgd_throughput.main(["--dataset", "mnist5k", "--members", "4", "--batch", "128"])
    pgd_throughput.main(["--arch", "resnet20", "--dataset", "cifar10", "--members", "8", "--batch", "64",
                         "--reps", "5"])
    defense_cost.main([])
    attack_cost.main([])
    igat_step.main([])
