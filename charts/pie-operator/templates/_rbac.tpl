{{/*
THE list of permissions the operator needs: one place, mirrored by EXPECTED_RULES in tests/unit/test_chart.py so
that adding a verb is a deliberate change in both. Each rule names the code that needs it.
*/}}

{{/* Rules valid in a Role: everything the operator does inside a watched namespace. */}}
{{- define "pie-operator.rules.namespaced" -}}
# k8s.py get_deployment/list_deployments (resync); kopf list+watch; kopf patches the object only to drop a
# stale kopf finalizer (its bookkeeping lives in status.kopf).
- apiGroups: [pie.io]
  resources: [piedeployments]
  verbs: [get, list, watch, patch]
# k8s.py patch_status and kopf's StatusProgressStorage / StatusDiffBaseStorage (merge patches of /status).
- apiGroups: [pie.io]
  resources: [piedeployments/status]
  verbs: [patch]
# Children carry a controller ownerReference with blockOwnerDeletion: true, which (with the
# OwnerReferencesPermissionEnforcement admission plugin) needs update on the owner's finalizers.
- apiGroups: [pie.io]
  resources: [piedeployments/finalizers]
  verbs: [update]
# k8s.py list_pods/create_pod/delete_pod/label_pod (the serving label: traffic follows the rollout gate); kopf's
# on.event watch of owned pods. Pods are never read one by one.
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch, create, delete, patch]
# k8s.py resize_pod: in-place memory resize (memory.apply: InPlace).
- apiGroups: [""]
  resources: [pods/resize]
  verbs: [patch]
# k8s.py apply (server-side apply = patch, and create when the object is new) and get of the owned singletons:
# Service X, ConfigMap X-engine, PodDisruptionBudget X.
- apiGroups: [""]
  resources: [services, configmaps]
  verbs: [get, create, patch]
# k8s.py ensure_admin_token: the engines' admin token, Secret X-admin-token, read by name and created once. Never
# patch/update (a Secret it finds without a token is reported, not changed), never list/watch (no bulk read).
# NOTE: resourceNames cannot narrow this further: the names depend on each PieDeployment's name (RBAC matches exact
# names, no prefixes), and a create request has no name RBAC could check at all.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, create]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, create, patch]
{{- if .Values.engineAdmin.networkPolicy }}
# k8s.py apply/get of NetworkPolicy X-admin (engineAdmin.networkPolicy): only the operator reaches the admin port.
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, create, patch]
{{- end }}
# k8s.py post_event and kopf's warning/error events: core/v1 Events only (events.k8s.io is not used).
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end }}

{{/* kopf's cluster observation: it lists+watches CRDs to notice the PieDeployment CRD changing. */}}
{{- define "pie-operator.rules.crds" -}}
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
{{- end }}

{{/* gh200.memoryModeLabel: k8s.py list_nodes reads the GPU memory mode label of the nodes engines run on. */}}
{{- define "pie-operator.rules.nodes" -}}
{{- if .Values.gh200.memoryModeLabel }}
- apiGroups: [""]
  resources: [nodes]
  verbs: [list]
{{- end }}
{{- end }}

{{/* Only when watching named namespaces: kopf lists+watches Namespaces to notice them (dis)appearing. */}}
{{- define "pie-operator.rules.namespaces" -}}
- apiGroups: [""]
  resources: [namespaces]
  verbs: [list, watch]
{{- end }}

{{/* kopf peering (peering.enabled): heartbeats in the peering object, and watching the other replicas'. */}}
{{- define "pie-operator.rules.peering.namespaced" -}}
- apiGroups: [kopf.dev]
  resources: [kopfpeerings]
  verbs: [get, list, watch, patch]
{{- end }}

{{- define "pie-operator.rules.peering.cluster" -}}
- apiGroups: [kopf.dev]
  resources: [clusterkopfpeerings]
  verbs: [get, list, watch, patch]
{{- end }}
