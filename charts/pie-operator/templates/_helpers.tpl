{{/* Names, labels and the install-time checks shared by every template. */}}

{{- define "pie-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* <release>-pie-operator, or just <release> when the release name already contains the chart name. */}}
{{- define "pie-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "pie-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "pie-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pie-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "pie-operator.labels" -}}
helm.sh/chart: {{ include "pie-operator.chart" . }}
{{ include "pie-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: pie
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "pie-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "pie-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "pie-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Labels of the engine pods and Services the operator creates (operator/pie_operator/builders.py). */}}
{{- define "pie-operator.engineLabels" -}}
app.kubernetes.io/name: pie-engine
app.kubernetes.io/managed-by: pie-operator
{{- end }}

{{/* True ("true") when the cluster serves kopf's peering CRDs. */}}
{{- define "pie-operator.hasPeeringAPI" -}}
{{- if .Values.watchNamespaces }}
{{- .Capabilities.APIVersions.Has "kopf.dev/v1/KopfPeering" }}
{{- else }}
{{- .Capabilities.APIVersions.Has "kopf.dev/v1/ClusterKopfPeering" }}
{{- end }}
{{- end }}

{{/* Install-time checks: refuse values that would run a broken operator instead of failing at runtime. */}}
{{- define "pie-operator.validate" -}}
{{- if and (gt (int .Values.replicas) 1) (not .Values.peering.enabled) }}
{{- fail "replicas > 1 needs peering.enabled=true: standalone operators would all reconcile the same objects and race to create pods" }}
{{- end }}
{{- if and .Values.peering.enabled (ne (include "pie-operator.hasPeeringAPI" .) "true") }}
{{- fail "peering.enabled=true needs kopf's peering CRDs (kopf.dev/v1 KopfPeering/ClusterKopfPeering) in the cluster: install them first (kopf's peering.yaml), or keep peering off with replicas: 1" }}
{{- end }}
{{- if lt (int .Values.resyncSeconds) 1 }}
{{- fail "resyncSeconds must be >= 1" }}
{{- end }}
{{- range .Values.watchNamespaces }}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" .) }}
{{- fail (printf "watchNamespaces: %q is not a valid namespace name" .) }}
{{- end }}
{{- end }}
{{- range .Values.hostPathAllowlist }}
{{- if or (not (hasPrefix "/" .)) (regexMatch "(^|/)\\.\\.?(/|$)|//" .) }}
{{- fail (printf "hostPathAllowlist: %q is not an absolute, normalized directory path like /models" .) }}
{{- end }}
{{- end }}
{{- if and .Values.gh200.memoryModeLabel .Values.watchNamespaces .Values.rbac.create (not .Values.rbac.discovery) }}
{{- fail "gh200.memoryModeLabel needs `list nodes` (cluster-scoped), which comes with rbac.discovery=true: set it, or gh200.memoryModeLabel=\"\" to skip the GPU memory mode check" }}
{{- end }}
{{- end }}
