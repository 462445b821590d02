{{/* Names, labels and images shared by every template. */}}

{{- define "captionfleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "captionfleet.fullname" -}}
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

{{- define "captionfleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "captionfleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "captionfleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "captionfleet.labels" -}}
helm.sh/chart: {{ include "captionfleet.chart" . }}
{{ include "captionfleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: captionfleet
{{- end }}

{{/*
The chart's labels plus a values map of extra ones (dict "root" $ "extra" MAP "where" "KEY"). An extra
label may not be one of the chart's own: the YAML would hold the key twice, and the selectors and the
app.kubernetes.io conventions depend on the chart's value.
*/}}
{{- define "captionfleet.labelsWith" -}}
{{- $own := include "captionfleet.labels" .root | fromYaml }}
{{- range $key, $_ := .extra }}
{{- if hasKey $own $key }}
{{- fail (printf "%s: %q is one of the chart's own labels (%s); choose another key" $.where $key (keys $own | sortAlpha | join ", ")) }}
{{- end }}
{{- end }}
{{- include "captionfleet.labels" .root }}
{{- with .extra }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The base name of the release's cluster-scoped objects (ClusterRoles and their bindings): the release
name is unique only within its namespace, so two releases of the same name in two namespaces must
not share a ClusterRole.
*/}}
{{- define "captionfleet.clusterScopedName" -}}
{{- printf "%s-%s" (include "captionfleet.fullname" .) .Release.Namespace }}
{{- end }}

{{- define "captionfleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "captionfleet.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
An image reference from {repository, tag} (dict "image" ... "root" $): the tag is the chart's appVersion
when empty, and may carry a digest (TAG@sha256:...) or be a digest alone (@sha256:...: repository@digest).
*/}}
{{- define "captionfleet.imageRef" -}}
{{- $tag := default .root.Chart.AppVersion .image.tag }}
{{- if hasPrefix "@" $tag }}
{{- printf "%s%s" .image.repository $tag }}
{{- else }}
{{- printf "%s:%s" .image.repository $tag }}
{{- end }}
{{- end }}

{{- define "captionfleet.image" -}}
{{- include "captionfleet.imageRef" (dict "image" .Values.image "root" .) }}
{{- end }}

{{- define "captionfleet.runtimeImage" -}}
{{- include "captionfleet.imageRef" (dict "image" .Values.operator.runtimeImage "root" .) }}
{{- end }}

{{/* "" when the operator watches every namespace, else the comma-separated list. */}}
{{- define "captionfleet.watchNamespaces" -}}
{{- join "," (uniq .Values.operator.watchNamespaces) }}
{{- end }}

{{/* The model bundled in the runtime image (Dockerfile.runtime links it to this path). */}}
{{- define "captionfleet.bundledModel" -}}
file:///opt/captionfleet/models/scenes-blip-tiny
{{- end }}

{{/* The Secret holding the operator's master key (operatorKey), and where the operator reads it. */}}
{{- define "captionfleet.operatorKeySecret" -}}
{{- default (printf "%s-operator-key" (include "captionfleet.fullname" . | trunc 50 | trimSuffix "-")) .Values.operatorKey.existingSecret }}
{{- end }}

{{- define "captionfleet.operatorKeyFile" -}}
{{- if .Values.operatorKey.enabled }}/etc/captionfleet/operator-key/operator-key{{ end }}
{{- end }}

{{/* The operator's options (OperatorSettings) the chart sets, as CAPTIONFLEET_* variables. */}}
{{- define "captionfleet.operatorEnv" -}}
CAPTIONFLEET_NAMESPACES: {{ include "captionfleet.watchNamespaces" . | quote }}
CAPTIONFLEET_DEFAULT_RUNTIME_IMAGE: {{ include "captionfleet.runtimeImage" . | quote }}
CAPTIONFLEET_IMAGE_PULL_POLICY: {{ .Values.operator.runtimeImage.pullPolicy | quote }}
CAPTIONFLEET_PROMETHEUS_URL: {{ .Values.operator.prometheusUrl | quote }}
CAPTIONFLEET_PEERING: {{ .Values.operator.peering.name | quote }}
CAPTIONFLEET_STANDALONE: {{ not .Values.operator.peering.enabled | quote }}
CAPTIONFLEET_LIVENESS: {{ printf "http://0.0.0.0:%d/healthz" (int .Values.operator.healthPort) | quote }}
CAPTIONFLEET_METRICS: {{ printf "http://0.0.0.0:%d/metrics" (int .Values.operator.metricsPort) | quote }}
CAPTIONFLEET_RESYNC_SECONDS: {{ .Values.operator.resyncSeconds | quote }}
CAPTIONFLEET_VERBOSE: {{ .Values.operator.verbose | quote }}
CAPTIONFLEET_OPERATOR_KEY_FILE: {{ include "captionfleet.operatorKeyFile" . | quote }}
{{- end }}

{{/*
A Prometheus duration ("1m30s") in milliseconds, to compare two of them.
*/}}
{{- define "captionfleet.durationMs" -}}
{{- $units := dict "ms" 1 "s" 1000 "m" 60000 "h" 3600000 "d" 86400000 "w" 604800000 "y" 31536000000 }}
{{- $total := 0 }}
{{- range regexFindAll "[0-9]+(ms|s|m|h|d|w|y)" . -1 }}
{{- $total = add $total (mul (regexFind "^[0-9]+" . | atoi) (get $units (regexFind "[a-z]+$" .))) }}
{{- end }}
{{- $total }}
{{- end }}

{{/*
The scrape timeout: the value, cut to the interval when longer (Prometheus refuses a timeout above
the interval, so `interval: 5s` alone must not break the monitors).
*/}}
{{- define "captionfleet.scrapeTimeout" -}}
{{- $monitor := .Values.metrics.serviceMonitor }}
{{- if gt (include "captionfleet.durationMs" $monitor.scrapeTimeout | atoi) (include "captionfleet.durationMs" $monitor.interval | atoi) }}
{{- $monitor.interval }}
{{- else }}
{{- $monitor.scrapeTimeout }}
{{- end }}
{{- end }}

{{/*
A Kubernetes quantity ("500m", "1Gi", 2, "1e3") as a number, to compare a request with its limit.
*/}}
{{- define "captionfleet.quantity" -}}
{{- $text := toString . }}
{{- $number := regexFind "^[+]?([0-9]+([.][0-9]*)?|[.][0-9]+)([eE][-+]?[0-9]+)?" $text }}
{{- $scales := dict "" 1.0 "n" 1e-9 "u" 1e-6 "m" 1e-3 "k" 1e3 "M" 1e6 "G" 1e9 "T" 1e12 "P" 1e15 "E" 1e18 "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0 "Pi" 1125899906842624.0 "Ei" 1152921504606846976.0 }}
{{- mulf (float64 $number) (get $scales (trimPrefix $number $text)) }}
{{- end }}

{{/* Fails when a resource request is above its limit (the API server refuses such a pod). */}}
{{- define "captionfleet.checkResources" -}}
{{- $limits := .Values.resources.limits | default dict }}
{{- range $name, $request := .Values.resources.requests | default dict }}
{{- if hasKey $limits $name }}
{{- $limit := index $limits $name }}
{{- if gt (include "captionfleet.quantity" $request | float64) (include "captionfleet.quantity" $limit | float64) }}
{{- fail (printf "resources.requests.%s (%v) is above resources.limits.%s (%v): the API server refuses such a pod; raise the limit too" $name $request $name $limit) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
