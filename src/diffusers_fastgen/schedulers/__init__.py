from .recipes import (
    causal_scheduler,
    check_causal_scheduler,
    flow_map_scheduler,
    flow_match_sde_scheduler,
    lcm_scheduler,
    scm_rf_scheduler,
    scm_scheduler,
    scm_set_timesteps_kwargs,
    shift_times,
    t_list_from_scheduler,
)
from .scheduling_flow_match_few_step import FlowMatchFewStepScheduler
