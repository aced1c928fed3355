"""A real local Kubernetes control plane for tests and the demo.

etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok (simulated GH200 nodes), built from source.
"""
