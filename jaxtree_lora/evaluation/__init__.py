"""Evaluation: continual metrics over the accuracy matrix (`continual`) and TRACE's task metrics
(`task_metrics`)."""
