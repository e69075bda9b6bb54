{{/* Chart name, overridable. */}}
{{- define "aiaas.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the release name if it contains the chart name, else <release>-<chart>. */}}
{{- define "aiaas.fullname" -}}
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

{{- define "aiaas.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "aiaas.labels" -}}
helm.sh/chart: {{ include "aiaas.chart" . }}
{{ include "aiaas.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: aiaas
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Labels that select the operator pods. */}}
{{- define "aiaas.selectorLabels" -}}
app.kubernetes.io/name: {{ include "aiaas.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "aiaas.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "aiaas.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "aiaas.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "aiaas.trainerImage" -}}
{{- default (printf "localhost/aiaas-trainer:%s" .Chart.AppVersion) .Values.operator.trainerImage }}
{{- end }}

{{- define "aiaas.leaseName" -}}
{{- default (include "aiaas.fullname" .) .Values.operator.leaderElection.leaseName }}
{{- end }}

{{/* Labels of objects that are part of the monitoring setup (ServiceMonitor, PodMonitor, rules, dashboard). */}}
{{- define "aiaas.monitoringLabels" -}}
helm.sh/chart: {{ include "aiaas.chart" . }}
app.kubernetes.io/name: {{ include "aiaas.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: monitoring
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: aiaas
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}
