{{/*
Names and labels (the controller-rs / `helm create` conventions).
*/}}
{{- define "metabridge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "metabridge.fullname" -}}
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

{{- define "metabridge.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "metabridge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "metabridge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "metabridge.labels" -}}
helm.sh/chart: {{ include "metabridge.chart" . }}
{{ include "metabridge.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: node-agent
{{- end }}

{{- define "metabridge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "metabridge.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "metabridge.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
The iptables -i patterns: the preset's pattern plus intercept.interfaces,
de-duplicated, comma-joined (METABRIDGE_INTERCEPT_INTERFACES).
*/}}
{{- define "metabridge.interceptInterfaces" -}}
{{- $presets := dict "aws-vpc-cni" "eni+" "calico" "cali+" "cilium" "lxc+" "gke" "gke+" "custom" "" }}
{{- if not (hasKey $presets .Values.intercept.preset) }}
{{- fail (printf "intercept.preset %q is not one of aws-vpc-cni, calico, cilium, gke, custom" .Values.intercept.preset) }}
{{- end }}
{{- $list := list }}
{{- with get $presets .Values.intercept.preset }}
{{- $list = append $list . }}
{{- end }}
{{- range .Values.intercept.interfaces }}
{{- $list = append $list . }}
{{- end }}
{{- $list = uniq $list }}
{{- if not $list }}
{{- fail "intercept.preset is custom but intercept.interfaces is empty: give at least one iptables -i pattern (e.g. veth+)" }}
{{- end }}
{{- join "," $list }}
{{- end }}

{{/*
Cross-field checks the schema cannot phrase as clearly.
*/}}
{{- define "metabridge.validate" -}}
{{- if and .Values.gce.enabled (not .Values.gce.workloadIdentityProvider) }}
{{- fail "gce.enabled is true but gce.workloadIdentityProvider is empty: set projects/NUMBER/locations/global/workloadIdentityPools/POOL/providers/PROVIDER" }}
{{- end }}
{{- if and .Values.gce.enabled (hasSuffix ".svc.id.goog" .Values.gce.workloadIdentityProvider) (not (and .Values.gce.projectNumber .Values.gce.clusterIssuer)) }}
{{- fail "gce.workloadIdentityProvider is GKE's built-in pool (PROJECT.svc.id.goog): also set gce.projectNumber and gce.clusterIssuer (https://container.googleapis.com/v1/projects/P/locations/L/clusters/C)" }}
{{- end }}
{{- if and .Values.imds.enabled (not .Values.imds.region) }}
{{- fail "imds.enabled is true but imds.region is empty: set the AWS region (e.g. us-east-1)" }}
{{- end }}
{{- if and .Values.imds.enabled (eq .Values.imds.tokenSource "google") (not .Values.gce.enabled) }}
{{- fail "imds.tokenSource=google mints Google ID tokens through the workload identity provider: enable gce (gce.enabled, gce.workloadIdentityProvider)" }}
{{- end }}
{{- if eq (int .Values.ports.metadata) (int .Values.ports.admin) }}
{{- fail "ports.metadata and ports.admin must differ" }}
{{- end }}
{{- end }}
