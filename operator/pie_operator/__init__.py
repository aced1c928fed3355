"""Pie operator: reconciles `PieDeployment` (pie.io/v1alpha1) objects into engine pods on GH200 nodes."""

__version__ = "0.1.0"
