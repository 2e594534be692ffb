{{/*
The chart name, or nameOverride.
*/}}
{{- define "floodgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every resource: fullnameOverride, else the release name when it already contains
the chart name, else `<release>-<chart>`; at most 63 characters less room for "-gateway".
*/}}
{{- define "floodgate.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 55 | trimSuffix "-" }}
{{- else }}
{{- $name := include "floodgate.name" . }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 55 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 55 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The name of the gateway's Deployment, Service, ServiceAccount, Role and RoleBinding.
*/}}
{{- define "floodgate.gateway.fullname" -}}
{{- printf "%s-gateway" (include "floodgate.fullname" .) }}
{{- end }}

{{- define "floodgate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every resource.
*/}}
{{- define "floodgate.labels" -}}
helm.sh/chart: {{ include "floodgate.chart" . }}
app.kubernetes.io/name: {{ include "floodgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: floodgate
{{- end }}

{{/*
Labels of the gateway's resources.
*/}}
{{- define "floodgate.gateway.labels" -}}
{{ include "floodgate.labels" . }}
app.kubernetes.io/component: gateway
{{- end }}

{{/*
The gateway pods' selector (immutable on a Deployment: keep it stable).
*/}}
{{- define "floodgate.gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "floodgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end }}

{{/*
The gateway image.
*/}}
{{- define "floodgate.gateway.image" -}}
{{- printf "%s:%s" .Values.gateway.image.repository (.Values.gateway.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/*
The name of the operator's Deployment, ServiceAccount, Role and RoleBinding.
*/}}
{{- define "floodgate.operator.fullname" -}}
{{- printf "%s-operator" (include "floodgate.fullname" .) }}
{{- end }}

{{/*
Labels of the operator's resources.
*/}}
{{- define "floodgate.operator.labels" -}}
{{ include "floodgate.labels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
The operator pods' selector (immutable on a Deployment: keep it stable).
*/}}
{{- define "floodgate.operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "floodgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
The operator image.
*/}}
{{- define "floodgate.operator.image" -}}
{{- printf "%s:%s" .Values.operator.image.repository (.Values.operator.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* The sidecar webhook's Service, configuration and operator-made TLS Secret. */}}
{{- define "floodgate.webhook.fullname" -}}
{{- printf "%s-webhook" (include "floodgate.operator.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- define "floodgate.webhook.configuration" -}}
{{- printf "%s-sidecar-injector" (include "floodgate.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- define "floodgate.webhook.secret" -}}
{{- printf "%s-tls" (include "floodgate.webhook.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
