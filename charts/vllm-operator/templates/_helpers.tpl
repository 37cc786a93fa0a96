{{/*
The chart name, or nameOverride.
*/}}
{{- define "vllm-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every resource name: fullnameOverride, else the release name plus the chart
name unless the release name already contains it. Truncated to 63 characters (DNS label).
*/}}
{{- define "vllm-operator.fullname" -}}
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

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "vllm-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every resource of the chart.
*/}}
{{- define "vllm-operator.labels" -}}
helm.sh/chart: {{ include "vllm-operator.chart" . }}
{{ include "vllm-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Labels that select the operator pod (immutable once installed: keep them few).
*/}}
{{- define "vllm-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vllm-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The ServiceAccount the operator runs as.
*/}}
{{- define "vllm-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "vllm-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The operator image: repository and tag (the chart's appVersion unless set).
*/}}
{{- define "vllm-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
The rules the operator needs, shared by the ClusterRole and the namespaced Roles: exactly the
calls it makes. The chart tests run the operator as this ServiceAccount; each verb was checked
by taking it away and watching the operator fail. kopf watches VLLMModels and keeps its state
in their annotations (patch); the reconciler reads a model (get), reads and server-side applies
Deployments and Services (get, create, patch), lists Pods, patches the status subresource and
posts Events. No update (server-side apply is a patch), no delete (owner references let the
garbage collector do it). Secrets: `create` only, for each LoRA model's adapter admin token;
the operator never reads, lists or changes a Secret (pods read them through the kubelet).
*/}}
{{- define "vllm-operator.rules" -}}
- apiGroups: ["serving.vllm-operator.io"]
  resources: ["vllmmodels"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["serving.vllm-operator.io"]
  resources: ["vllmmodels/status"]
  verbs: ["patch"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["create"]
{{- end }}

{{/*
The operator's command line: the watch scope, its endpoints and the log level.
*/}}
{{- define "vllm-operator.args" -}}
- run
{{- if .Values.watchNamespaces }}
{{- range .Values.watchNamespaces }}
- --namespace={{ . }}
{{- end }}
{{- else }}
- --all-namespaces
{{- end }}
- --liveness=http://0.0.0.0:{{ .Values.ports.liveness }}/healthz
- --metrics-port={{ .Values.ports.metrics }}
{{- if .Values.verbose }}
- --verbose
{{- end }}
{{- end }}

{{/*
The Secret holding the key the operator derives adapter admin tokens from (a DNS label too).
*/}}
{{- define "vllm-operator.adminKeySecret" -}}
{{- printf "%s-admin-key" (include "vllm-operator.fullname" . | trunc 53 | trimSuffix "-") }}
{{- end }}
