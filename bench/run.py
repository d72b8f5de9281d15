"""`make bench`: every benchmark with its default settings, each printing its Markdown section."""

from bench import attack_cost, defense_cost, pgd_throughput

if __name__ == "__main__":
    pgd_throughput.main([])
    defense_cost.main([])
    attack_cost.main([])
