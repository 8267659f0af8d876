"""Floor 5: recipes (YAML front end to the graph)."""

from surgery.recipe.build import Recipe, build_recipe, load_recipe, parse_recipe
from surgery.recipe.run import (
    GreedySoupStep,
    PlanReport,
    greedy_soup_steps,
    plan_recipe,
    run_recipe,
)

__all__ = ["GreedySoupStep", "PlanReport", "Recipe", "build_recipe", "greedy_soup_steps",
           "load_recipe", "parse_recipe", "plan_recipe", "run_recipe"]
