"""Online half of Brownout: attach united experts to a transformers MoE model and turn the brownout ratio."""
