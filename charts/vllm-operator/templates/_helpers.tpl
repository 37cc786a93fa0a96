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
Labels on every resource of the chart, the operator's and the router's alike.
*/}}
{{- define "vllm-operator.commonLabels" -}}
helm.sh/chart: {{ include "vllm-operator.chart" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Labels on the operator's resources (and the CRD's).
*/}}
{{- define "vllm-operator.labels" -}}
{{ include "vllm-operator.commonLabels" . }}
{{ include "vllm-operator.selectorLabels" . }}
app.kubernetes.io/component: operator
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
Pod-level fields the operator's and the router's pods share: the image pull Secrets and the
pod security context (restricted Pod Security Standard). Under a pod `spec:`.
*/}}
{{- define "vllm-operator.podSecurity" -}}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
Container fields both containers share: the operator image (the router is a subcommand of the
same program) and the container security context. Under a container.
*/}}
{{- define "vllm-operator.containerBase" -}}
image: {{ include "vllm-operator.image" . }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
securityContext:
  {{- toYaml .Values.securityContext | nindent 2 }}
{{- end }}

{{/*
The scratch directory both containers mount, their root filesystem being read-only (Python and
the Kubernetes client may need one): `vllm-operator.tmpMount` under a container,
`vllm-operator.tmpVolume` under a pod `spec:`.
*/}}
{{- define "vllm-operator.tmpMount" -}}
volumeMounts:
  - name: tmp
    mountPath: /tmp
{{- end }}

{{- define "vllm-operator.tmpVolume" -}}
volumes:
  - name: tmp
    emptyDir: {}
{{- end }}

{{/*
Where a pod runs, from a map holding priorityClassName, nodeSelector, tolerations and affinity:
the top-level values for the operator, .Values.router for the router. Under a pod `spec:`;
empty when none is set.
*/}}
{{- define "vllm-operator.podPlacement" -}}
{{- with .priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
The rules the operator needs, shared by the ClusterRole and the namespaced Roles: exactly the
calls it makes. The chart tests run the operator as this ServiceAccount; each verb was checked
by taking it away and watching the operator fail. kopf watches VLLMModels and keeps its state
in their annotations (patch); the reconciler reads a model (get), reads and server-side applies
Deployments and Services (get, create, patch), lists Pods, patches the status subresource,
patches the scale subresource (the autoscaler's only write of spec.replicas) and posts Events. No update (server-side apply is a patch), no delete (owner references let the
garbage collector do it). Secrets: `create` only, for each LoRA model's adapter admin token;
the operator never reads, lists or changes a Secret (pods read them through the kubelet).
*/}}
{{- define "vllm-operator.rules" -}}
- apiGroups: ["serving.vllm-operator.io"]
  resources: ["vllmmodels"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["serving.vllm-operator.io"]
  resources: ["vllmmodels/status"]
  verbs: ["patch"]
- apiGroups: ["serving.vllm-operator.io"]
  resources: ["vllmmodels/scale"]
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
The namespaces the operator watches, as command line flags; the router serves the same ones.
*/}}
{{- define "vllm-operator.watchScope" -}}
{{- if .Values.watchNamespaces }}
{{- range .Values.watchNamespaces }}
- --namespace={{ . }}
{{- end }}
{{- else }}
- --all-namespaces
{{- end }}
{{- end }}

{{/*
The operator's command line: the watch scope, its endpoints and the log level.
*/}}
{{- define "vllm-operator.args" -}}
- run
{{- include "vllm-operator.watchScope" . }}
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

{{/*
The router's resource names: the full name plus `-router`, within a DNS label's 63 characters.
Its Service, hence the OpenAI endpoint http://<this>.<namespace>.svc:<router.port>/v1.
*/}}
{{- define "vllm-operator.router.fullname" -}}
{{- printf "%s-router" (include "vllm-operator.fullname" . | trunc 56 | trimSuffix "-") }}
{{- end }}

{{/*
Labels that select the router's pods. Their `name` differs from the operator's, so that neither
the operator's Deployment nor its metrics Service (which select by name and instance) ever
matches a router pod.
*/}}
{{- define "vllm-operator.router.selectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-router" (include "vllm-operator.name" . | trunc 56 | trimSuffix "-") }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels on the router's resources.
*/}}
{{- define "vllm-operator.router.labels" -}}
{{ include "vllm-operator.commonLabels" . }}
{{ include "vllm-operator.router.selectorLabels" . }}
app.kubernetes.io/component: router
app.kubernetes.io/part-of: {{ include "vllm-operator.name" . }}
{{- end }}

{{/*
The ServiceAccount the router runs as (never the operator's: the router only reads).
*/}}
{{- define "vllm-operator.router.serviceAccountName" -}}
{{- if .Values.router.serviceAccount.create }}
{{- default (include "vllm-operator.router.fullname" .) .Values.router.serviceAccount.name }}
{{- else }}
{{- required "router.serviceAccount.name is required when router.serviceAccount.create is false" .Values.router.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The rules the router needs, shared by its ClusterRole and namespaced Roles: it watches
VLLMModels (get, list, watch) and their pods (list, watch) to know where each model is served.
Its one write is a model's scale subresource (patch), to wake a model at zero for the requests
it holds; it changes nothing else and reads no Secret.
*/}}
{{- define "vllm-operator.router.rules" -}}
- apiGroups: ["serving.vllm-operator.io"]
  resources: ["vllmmodels"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["serving.vllm-operator.io"]
  resources: ["vllmmodels/scale"]
  verbs: ["patch"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
{{- end }}

{{/*
The router's command line: the operator's watch scope (watchNamespaces), the models it serves,
where it listens, how long it drains on SIGTERM and the log level.
*/}}
{{- define "vllm-operator.router.args" -}}
- router
{{- include "vllm-operator.watchScope" . }}
{{- with .Values.router.selector }}
- {{ printf "--selector=%s" . | quote }}
{{- end }}
- --host=0.0.0.0
- --port={{ .Values.router.port }}
- --grace-seconds={{ .Values.router.graceSeconds }}
{{- if .Values.router.verbose }}
- --verbose
{{- end }}
{{- end }}
